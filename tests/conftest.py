"""Shared fixtures: a tiny random Stable Diffusion model saved as a diffusers folder, no network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random SD model (VAE factor 8, UNet sample size 32) saved with save_pretrained."""
    from model_factory import save_random_sd_model  # imported here: the Blender-only run has no torch

    return save_random_sd_model(str(tmp_path_factory.mktemp("models") / "tiny-sd"))
