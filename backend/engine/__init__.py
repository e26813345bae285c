"""The diffusion engine: THE denoising loop (``sampler``), the one denoiser interface, wrap-aware decoding,
memory plans, model loading and the model cache on disk, perceptual losses, and the synchronisation
strategies (``sync/``).

May import ``sphere`` and the leaves; never ``products``, ``analysis`` or ``app``.
"""
