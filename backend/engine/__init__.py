"""The diffusion engine: one request resolved once (``resolve``), the stages of one image (``generation``),
THE denoising loop (``sampler``), the one denoiser interface, wrap-aware decoding, memory plans, model loading
and the model caches, perceptual losses, and the synchronisation strategies (``sync/``).

May import ``sphere`` and the leaves; never ``products``, ``analysis`` or ``app``.
"""
