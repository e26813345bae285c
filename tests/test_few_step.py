"""Few-step models (issue #6): Latent Consistency Models with their scheduler and guidance embedding,
LoRA weights fused into a model (LCM-LoRA's route), SD-Turbo-style trailing schedulers, with the
synchronisation methods; x0 comes from the consistency model's own denoised output."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler
from model_factory import TINY_UNET, save_random_lora, save_random_sd_model
from PIL import Image

from backend.app.cli import main
from backend.engine.models import ModelCache
from backend.app.job import check_request, run_job
from backend.engine.generation import make_scheduler
from backend.request import GenerateRequest
from backend.engine.sync.tweedie import predicted_clean_latent, prediction_for_clean_latent

LCM_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50)


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory):
    """A tiny guidance-distilled LCM: a UNet with a guidance embedding input (time_cond_proj_dim) and an LCMScheduler."""
    return save_random_sd_model(str(tmp_path_factory.mktemp("models") / "tiny-lcm"), unet_config={**TINY_UNET, "time_cond_proj_dim": 32},
                                scheduler=LCMScheduler(**LCM_SCHEDULER))


@pytest.fixture(scope="module")
def turbo_model(tmp_path_factory):
    """A tiny model shipped, as SD-Turbo is, with an Euler scheduler spaced 'trailing'."""
    return save_random_sd_model(str(tmp_path_factory.mktemp("models") / "tiny-turbo"),
                                scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                                 timestep_spacing="trailing"))


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def _request(model, tmp_path, name, **settings):
    base = dict(prompt="a canyon", layout="equirect", width=512, height=256, steps=4, seed=2, window=16, stride=8,
                model=model, device="cpu", out=str(tmp_path / name))
    return GenerateRequest(**{**base, **settings})


def test_auto_scheduler_is_the_models_own_for_few_step_models_and_ddim_otherwise(lcm_model, turbo_model, tiny_model):
    from diffusers import StableDiffusionPipeline

    def auto(folder):
        return type(make_scheduler("auto", StableDiffusionPipeline.from_pretrained(folder).scheduler.config)).__name__

    assert auto(lcm_model) == "LCMScheduler"
    assert auto(turbo_model) == "EulerDiscreteScheduler"
    assert auto(tiny_model) == "DDIMScheduler"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_clean_latent_is_the_schedulers_denoised_output(prediction_type):
    scheduler = LCMScheduler(**LCM_SCHEDULER, prediction_type=prediction_type)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    latents, prediction = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for timestep in scheduler.timesteps:
        denoised = scheduler.step(prediction, timestep, latents, generator=torch.Generator().manual_seed(1)).denoised
        ours = predicted_clean_latent(scheduler, latents, prediction, timestep)
        torch.testing.assert_close(ours, denoised, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prediction_for_clean_latent(scheduler, latents, ours, timestep), prediction, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("settings", [
    dict(views="band"),
    dict(views="band+poles"),
    dict(views="band", sync="syncdiffusion", sync_steps=2, sync_loss="lpips-alex", sync_loss_backbone="random"),
    dict(views="cube", sync="syncdiffusion", sync_steps=1, sync_loss="lpips-alex", sync_loss_backbone="random"),
    dict(views="band", sync="syncsde"),
    dict(views="ring", sync="syncsde"),
    dict(mad_steps=2),
    dict(mad_steps=2, sync="syncsde"),
], ids=["band", "band+poles", "syncdiffusion", "syncdiffusion-cube", "syncsde", "syncsde-ring", "mad", "mad+syncsde"])
def test_a_four_step_lcm_panorama_runs_with_each_method(lcm_model, models, tmp_path, settings):
    request = _request(lcm_model, tmp_path, "lcm", guidance=8.0, **settings)
    outputs = run_job(check_request(request), models=models)
    metadata = json.loads(open(outputs["metadata"]).read())
    assert metadata["scheduler"] == "LCMScheduler"
    image = np.asarray(Image.open(outputs["png"]))
    assert image.shape == (256, 512, 3) and image.std() > 1


def test_lcm_guidance_is_an_embedding_with_one_unet_pass_per_view(lcm_model, models, tmp_path):
    calls = []
    results = []
    for guidance in (2.0, 8.0):
        checked = check_request(_request(lcm_model, tmp_path, f"g{guidance}", guidance=guidance, views="band"))
        unet = models.get(checked).pipeline.unet
        handle = unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
            (args[0].shape[0], kwargs.get("timestep_cond") is not None)), with_kwargs=True)
        try:
            results.append(np.asarray(Image.open(run_job(checked, models=models)["png"])))
        finally:
            handle.remove()
    assert all(has_condition for _, has_condition in calls)
    assert max(batch for batch, _ in calls) <= 4  # no unconditional half: one row per view (view batch 4)
    assert not np.array_equal(results[0], results[1])  # the embedding carries the guidance scale


def test_a_one_step_turbo_style_panorama(turbo_model, models, tmp_path):
    for fusion in ("noisy", "clean"):
        request = _request(turbo_model, tmp_path, fusion, steps=1, guidance=0.0, views="band+poles", fusion=fusion)
        outputs = run_job(check_request(request), models=models)
        metadata = json.loads(open(outputs["metadata"]).read())
        assert metadata["scheduler"] == "EulerDiscreteScheduler" and metadata["fusion"] == fusion
        assert np.isfinite(np.asarray(Image.open(outputs["png"]), dtype=np.float32)).all()


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory):
    return save_random_lora(str(tmp_path_factory.mktemp("lora")), tiny_model)


def test_lora_weights_are_fused_and_scale_zero_is_the_base_model(tiny_model, lora, models, tmp_path):
    images = {}
    for name, settings in {"base": {}, "lora": dict(lora=lora), "zero": dict(lora=lora, lora_scale=0.0)}.items():
        request = _request(tiny_model, tmp_path, name, layout="wide", width=256, height=128, **settings)
        images[name] = np.asarray(Image.open(run_job(check_request(request), models=models)["png"])).astype(int)
    assert np.abs(images["lora"] - images["base"]).max() > 10
    assert np.abs(images["zero"] - images["base"]).max() <= 1
    # The fused model is not left behind in the cache for a job without the LoRA.
    again = _request(tiny_model, tmp_path, "again", layout="wide", width=256, height=128)
    assert np.array_equal(np.asarray(Image.open(run_job(check_request(again), models=models)["png"])).astype(int), images["base"])


@pytest.mark.parametrize("make,message", [
    (lambda tmp: str(tmp / "missing.safetensors"), "does not exist"),
    (lambda tmp: (tmp / "weights.bin").write_bytes(b"x") and str(tmp / "weights.bin"), "pickled LoRA weights"),
    (lambda tmp: (tmp / "empty").mkdir() or str(tmp / "empty"), "has no .safetensors"),
])
def test_bad_lora_paths_are_one_sentence_and_exit_2(tiny_model, tmp_path, capsys, make, message):
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--lora", make(tmp_path),
                 "--layout", "wide", "--width", "256", "--height", "128", "--window", "16", "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_a_lora_for_another_architecture_is_refused(tiny_model, lcm_model, tmp_path, capsys, tmp_path_factory):
    # LoRA layers built for a UNet with other channel counts do not fit the tiny model.
    other = save_random_sd_model(str(tmp_path / "other"), unet_config={**TINY_UNET, "block_out_channels": (8, 16)})
    weights = save_random_lora(str(tmp_path / "other-lora"), other)
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(tmp_path / "out"), "--lora", weights,
                 "--layout", "wide", "--width", "256", "--height", "128", "--window", "16", "--device", "cpu", "--steps", "1"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "do not fit this model" in error
