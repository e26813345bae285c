"""The LDM single-file writer round-trips through diffusers' own single-file loader."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers reads it: no network in tests

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from safetensors import safe_open  # noqa: E402

from ldm_checkpoint import write_ldm_single_file  # noqa: E402
from model_factory import save_random_sd_model  # noqa: E402


def test_from_single_file_loads_back_every_weight(tmp_path):
    folder = save_random_sd_model(str(tmp_path / "diffusers"))
    path = write_ldm_single_file(folder, str(tmp_path / "model.safetensors"))

    # The file is in the original layout: diffusers would also accept linear VAE attention weights, so check
    # that they are the 1x1 convolutions the original checkpoints hold.
    with safe_open(path, "pt") as checkpoint:
        assert checkpoint.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape() == [4, 4, 1, 1]
        # The upsampler of the first (cross-attention) up level sits after its last resnet and attention.
        assert "model.diffusion_model.output_blocks.1.2.conv.weight" in checkpoint.keys()

    original = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    loaded = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)

    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(original, name).state_dict()
        actual = getattr(loaded, name).state_dict()
        assert actual.keys() == expected.keys(), name
        unequal = [key for key in expected if not torch.equal(actual[key], expected[key])]
        assert not unequal, f"{name}: {unequal}"


def test_cli_generates_the_same_image_from_a_single_file_checkpoint(tiny_model, tmp_path):
    from backend.app.cli import main

    checkpoint = write_ldm_single_file(tiny_model, str(tmp_path / "tiny.safetensors"))
    common = ["generate", "--prompt", "a canyon", "--layout", "tile", "--width", "128", "--height", "128",
              "--steps", "2", "--window", "16", "--stride", "8", "--seed", "11", "--device", "cpu"]
    assert main([*common, "--model", tiny_model, "--out", str(tmp_path / "folder")]) == 0
    assert main([*common, "--model", checkpoint, "--model-config", tiny_model, "--out", str(tmp_path / "single")]) == 0
    assert (tmp_path / "folder" / "panorama.png").read_bytes() == (tmp_path / "single" / "panorama.png").read_bytes()
