"""Synchronisation strategies: small named pieces the denoising loop in ``backend/sampler.py`` calls."""
