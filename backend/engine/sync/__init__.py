"""The synchronisation strategies the denoising loop calls: MultiDiffusion's fusion, Tweedie's x0, SyncDiffusion's
guidance, MAD's merged attention and SyncSDE."""
