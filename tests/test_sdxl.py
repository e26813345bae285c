"""SDXL through the one denoiser: a tiny random SDXL (two text encoders, pooled embedding and time ids through the
UNet's "text_time" embedding) built here and saved as a diffusers folder, no network."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from PIL import Image
from safetensors.torch import load_file, save_file

from backend.app.job import check_request, run_job
from backend.engine.models import ModelCache
from backend.request import GenerateRequest
from ldm_checkpoint import write_ldm_single_file
from model_factory import SD_SCHEDULER, TINY_SDXL_POOLED, TINY_SDXL_UNET, save_random_lora, save_random_sdxl_model


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    """Path of a tiny random SDXL model (VAE factor 8, SDXL's latent scale, UNet sample size 16)."""
    return save_random_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def models():
    return ModelCache()  # one load of the tiny SDXL for the module's jobs


def assert_single_window_matches_the_pipeline(reference: StableDiffusionXLPipeline, request: GenerateRequest,
                                              negative: str | None) -> dict:
    """Check that ``request`` (a ``wide`` canvas of one window: one view covering it) gives the image of
    ``reference`` (an SDXL pipeline with the weights and scheduler the request should use) at the request's prompt,
    size, steps, guidance and seed, within 2/255 per channel; ``negative``: the pipeline's negative prompt (None:
    none, the request's ""). Returns the job's outputs (``run_job``)."""
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        request.prompt, negative_prompt=negative, height=request.height, width=request.width,
        num_inference_steps=request.steps, guidance_scale=request.guidance,
        generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np",
    ).images[0]
    outputs = run_job(check_request(request))
    ours = np.asarray(Image.open(outputs["png"])).astype(np.float32) / 255.0
    assert ours.shape == expected.shape == (request.height, request.width, 3)
    difference = np.abs(ours - expected)
    # The PNG is quantised to 1/255, so the reference's float image differs by up to half a level for free.
    assert difference.max() <= 2 / 255, f"max difference {difference.max() * 255:.2f}/255"
    assert expected.std() > 0.01  # not vacuous: the image is not flat
    return outputs


@pytest.mark.parametrize("negative", ["blurry", None], ids=["negative prompt", "zeros for no negative prompt"])
def test_a_single_window_canvas_matches_diffusers_sdxl_pipeline(tiny_sdxl, tmp_path, negative):
    # One view covering the whole canvas: our conditioning per view is the pipeline's for the whole image.
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    request = GenerateRequest(prompt="a mountain lake at dawn", negative_prompt=negative or "", layout="wide", width=128,
                              height=128, steps=3, guidance=7.5, seed=1234, model=tiny_sdxl, device="cpu",
                              out=str(tmp_path / "ours"))
    outputs = assert_single_window_matches_the_pipeline(reference, request, negative)
    metadata = json.loads(open(outputs["metadata"]).read())
    assert metadata["params"]["window"] == 16 and metadata["views"] == 1


# 384 x 192 px equirect: 48 x 24 latents, tall enough for band+poles' row of 16-latent windows within ±60°.
WORLD = dict(layout="equirect", width=384, height=192)
SYNCDIFFUSION = dict(sync="syncdiffusion", sync_steps=2, sync_loss="lpips-alex", sync_loss_backbone="random")
WIDE = dict(layout="wide", width=256, height=128)
TILE = dict(layout="tile", width=128, height=128)


@pytest.mark.parametrize("settings", [
    dict(WORLD, prompt_up="clouds", prompt_down="grass"),
    dict(layout="wide", width=384, height=128),
    dict(layout="tile", width=128, height=128),
    dict(WORLD, **SYNCDIFFUSION),
    dict(WORLD, mad_steps=2),
    dict(layout="wide", width=256, height=128, sync="syncsde"),
    dict(WORLD, schedule="shifted", prompt_up="clouds"),
    # The rest of the layout x method grid (the default schedule of a tile is shifted, of the others dense).
    dict(WORLD, sync="syncsde"),
    dict(WIDE, schedule="shifted"),
    dict(WIDE, **SYNCDIFFUSION),
    dict(WIDE, mad_steps=2),
    dict(WIDE, fusion="clean"),
    dict(TILE, schedule="dense"),
    dict(TILE, **SYNCDIFFUSION),
    dict(TILE, mad_steps=2),
    dict(TILE, sync="syncsde"),
    dict(TILE, schedule="dense", fusion="clean"),
], ids=["equirect-band+poles-prompt-up-down", "wide", "tile", "syncdiffusion", "mad", "syncsde", "shifted",
        "equirect-syncsde", "wide-shifted", "wide-syncdiffusion", "wide-mad", "wide-clean-fusion", "tile-dense",
        "tile-syncdiffusion", "tile-mad", "tile-syncsde", "tile-dense-clean-fusion"])
def test_every_layout_and_method_runs_on_sdxl(tiny_sdxl, models, tmp_path, settings):
    torch.manual_seed(0)  # SyncDiffusion's random LPIPS trunk (pnet_rand) is drawn from torch's global generator
    request = GenerateRequest(prompt="a canyon", steps=2, seed=3, model=tiny_sdxl, device="cpu",
                              out=str(tmp_path / "out"), **settings)
    outputs = run_job(check_request(request), models=models)
    image = np.asarray(Image.open(outputs["png"]))
    assert image.shape == (settings["height"], settings["width"], 3) and image.std() > 1
    metadata = json.loads(open(outputs["metadata"]).read())
    assert metadata["params"]["window"] == 16
    layout = settings["layout"]
    if layout == "equirect":
        assert metadata["view_set"] == "band+poles" and set(outputs["faces"]) == set("FRBLUD")
        assert all(os.path.isfile(path) for path in (outputs["exr_sky"], outputs["lighting"]))
    if "prompt_up" in settings:
        assert "clouds" in metadata["view_prompts"]["U"]
    if "prompt_down" in settings:
        assert "grass" in metadata["view_prompts"]["D"]
    if settings.get("sync") == "syncdiffusion":
        assert metadata["syncdiffusion"]["guided_steps"] == 2 and not metadata["syncdiffusion"]["loss_pretrained"]
    if settings.get("sync") == "syncsde":
        assert metadata["syncsde"]["conditioned_views"] > 0
    if "mad_steps" in settings:
        assert metadata["mad"]["steps"] == 2
    # A tile's default schedule is shifted, but SyncSDE needs the dense schedule's overlapping windows.
    tile_default = layout == "tile" and settings.get("sync") != "syncsde"
    expected_schedule = settings.get("schedule") or ("shifted" if tile_default else "dense")
    assert metadata["schedule"] == expected_schedule
    if settings.get("sync") == "syncsde":  # every view keeps its own state, pulled towards its neighbours
        assert metadata["fusion"] == "own"
    elif "fusion" in settings:
        assert metadata["fusion"] == settings["fusion"]
    elif expected_schedule == "dense" and layout != "tile":  # MultiDiffusion's fusion of crop windows, SyncTweedies' with projected views
        assert metadata["fusion"] == {"equirect": "clean", "wide": "noisy"}[layout]


def test_mad_merges_attention_in_sdxl_blocks(tiny_sdxl, models, tmp_path):
    # The same world with and without merged attention: SDXL's transformer blocks (two layers in the deeper one,
    # linear projections) run MAD's processors, and the image changes.
    images = {}
    for mad_steps in (0, 2):
        request = GenerateRequest(prompt="a canyon", steps=2, seed=3, model=tiny_sdxl, device="cpu", mad_steps=mad_steps,
                                  out=str(tmp_path / f"mad{mad_steps}"), **WORLD)
        outputs = run_job(check_request(request), models=models)
        images[mad_steps] = np.asarray(Image.open(outputs["png"])).astype(int)
    assert json.loads(open(outputs["metadata"]).read())["mad"]["blocks"] == ["down", "mid", "up"]
    assert np.abs(images[2] - images[0]).max() > 2


def test_models_list_reports_the_sdxl_family(tiny_sdxl, capsys):
    from backend.app.cli import main

    assert main(["models", "list", "--folder", os.path.dirname(tiny_sdxl), "--json"]) == 0
    listed = {model["id"]: model for model in json.loads(capsys.readouterr().out)}
    model = listed[tiny_sdxl]
    assert (model["family"], model["architecture"], model["kind"], model["complete"]) == ("SDXL", "SDXL", "folder", True)


def test_a_half_precision_job_keeps_the_vae_in_float32_unless_it_is_the_fp16_fix(tiny_sdxl, tmp_path):
    from backend.engine.models import load_model, resolve_model_source

    # SDXL's own VAE overflows in float16, so its config asks for force_upcast: it decodes in float32, as diffusers'
    # SDXL pipeline upcasts it. The fp16-fix VAE that fine-tunes ship says force_upcast false: it stays in float16.
    fp16_fix = str(tmp_path / "fp16-fix")
    shutil.copytree(tiny_sdxl, fp16_fix)
    config_path = os.path.join(fp16_fix, "vae", "config.json")
    config = json.loads(open(config_path).read())
    with open(config_path, "w") as f:
        json.dump({**config, "force_upcast": False}, f)
    for folder, vae_dtype in ((tiny_sdxl, torch.float32), (fp16_fix, torch.float16)):
        model = load_model(resolve_model_source(folder), torch.device("cpu"), torch.float16)
        pipeline = model.pipeline
        assert model.architecture == "SDXL" and type(pipeline).__name__ == "StableDiffusionXLPipeline"
        assert pipeline.unet.dtype == pipeline.text_encoder_2.dtype == torch.float16
        assert pipeline.vae.dtype == vae_dtype


def test_lora_on_sdxl_is_fused_into_the_unet_and_both_text_encoders(tiny_sdxl, tmp_path):
    lora = save_random_lora(str(tmp_path / "lora"), tiny_sdxl, text_encoders=True)
    images, weights = {}, {}
    for name, settings in {"base": {}, "lora": dict(lora=lora), "zero": dict(lora=lora, lora_scale=0.0)}.items():
        checked = check_request(GenerateRequest(prompt="a canyon", layout="wide", width=256, height=128, steps=2,
                                                seed=3, model=tiny_sdxl, device="cpu", out=str(tmp_path / name),
                                                **settings))
        models = ModelCache()
        pipeline = models.get(checked).pipeline
        weights[name] = {component: torch.cat([p.flatten() for p in getattr(pipeline, component).parameters()])
                         for component in ("unet", "text_encoder", "text_encoder_2")}
        images[name] = np.asarray(Image.open(run_job(checked, models=models)["png"])).astype(int)
    for component, base in weights["base"].items():
        assert not torch.equal(weights["lora"][component], base), component
        torch.testing.assert_close(weights["zero"][component], base)
    assert np.abs(images["lora"] - images["base"]).max() > 10
    assert np.abs(images["zero"] - images["base"]).max() <= 1


def test_a_turbo_style_sdxl_runs_one_step_with_its_trailing_scheduler(tmp_path, capsys):
    from backend.app.cli import main

    # SDXL-Turbo ships an Euler ancestral scheduler with trailing timesteps, and runs without guidance.
    scheduler = EulerAncestralDiscreteScheduler(beta_start=SD_SCHEDULER["beta_start"], beta_end=SD_SCHEDULER["beta_end"],
                                                 beta_schedule="scaled_linear", timestep_spacing="trailing")
    turbo = save_random_sdxl_model(str(tmp_path / "models" / "tiny-sdxl-turbo"), scheduler=scheduler)
    assert main(["models", "list", "--folder", str(tmp_path / "models"), "--json"]) == 0
    (listed,) = [model for model in json.loads(capsys.readouterr().out) if model["id"] == turbo]
    assert (listed["family"], listed["architecture"]) == ("Turbo", "SDXL")
    request = GenerateRequest(prompt="a canyon", steps=1, guidance=0.0, seed=3, model=turbo, device="cpu",
                              out=str(tmp_path / "out"), **WORLD)
    outputs = run_job(check_request(request))
    metadata = json.loads(open(outputs["metadata"]).read())
    assert metadata["scheduler"] == "EulerAncestralDiscreteScheduler" and metadata["unet_rows"] == metadata["views"]
    image = np.asarray(Image.open(outputs["png"]), dtype=np.float32)
    assert image.shape == (192, 384, 3) and image.std() > 1


def test_syncdiffusions_taesd_decoder_is_taesdxl_for_sdxl_latents(tiny_sdxl, models, tmp_path):
    from backend.errors import ModelNotFound

    # Offline with nothing cached: the sentence names the tiny autoencoder of SDXL's latents, not SD's TAESD.
    request = GenerateRequest(prompt="a canyon", steps=2, seed=3, model=tiny_sdxl, device="cpu", sync_decoder="taesd",
                              out=str(tmp_path / "out"), **WORLD, **SYNCDIFFUSION)
    with pytest.raises(ModelNotFound, match="madebyollin/taesdxl "):
        run_job(check_request(request), models=models)


def test_a_single_file_sdxl_checkpoint_with_model_config_gives_the_folders_image(tiny_sdxl, tmp_path, capsys):
    from backend.app.cli import main

    # Stability's original layout: label_emb, conditioner.embedders.0 (CLIP) and .1 (OpenCLIP, fused q/k/v).
    (tmp_path / "checkpoints").mkdir()
    checkpoint = write_ldm_single_file(tiny_sdxl, str(tmp_path / "checkpoints" / "tiny-sdxl.safetensors"))
    assert main(["models", "list", "--folder", str(tmp_path / "checkpoints"), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["kind"], listed["family"], listed["architecture"]) == ("single_file", "SDXL", "SDXL")
    common = ["generate", "--prompt", "a canyon", "--layout", "tile", "--width", "128", "--height", "128",
              "--steps", "2", "--seed", "11", "--device", "cpu"]
    assert main([*common, "--model", tiny_sdxl, "--out", str(tmp_path / "folder")]) == 0
    assert main([*common, "--model", checkpoint, "--model-config", tiny_sdxl, "--out", str(tmp_path / "single")]) == 0
    assert (tmp_path / "folder" / "panorama.png").read_bytes() == (tmp_path / "single" / "panorama.png").read_bytes()
    metadata = json.loads((tmp_path / "single" / "metadata.json").read_text())
    assert metadata["model"]["kind"] == "single_file" and metadata["params"]["window"] == 16


def test_an_sdxl_unet_that_takes_other_time_ids_is_one_sentence(tmp_path):
    from backend.errors import BadRequest

    # The refiner's added embedding takes five ids (an aesthetic score instead of the target size).
    refiner_like = save_random_sdxl_model(str(tmp_path / "refiner-like"), unet_config={
        **TINY_SDXL_UNET, "projection_class_embeddings_input_dim": 5 * 8 + TINY_SDXL_POOLED})
    request = GenerateRequest(prompt="a canyon", layout="wide", width=128, height=128, steps=1, seed=3,
                              model=refiner_like, device="cpu", out=str(tmp_path / "out"))
    with pytest.raises(BadRequest, match=r"takes 72 values, not the 80 of six size and crop ids .*a refiner\?\)\.$"):
        run_job(check_request(request))
    assert not (tmp_path / "out").exists()


# SDXL-Lightning: ByteDance's distilled UNet for SDXL base (a whole-UNet .safetensors file, or a LoRA), sampled with
# Euler at trailing timesteps and no classifier-free guidance. SDXL base ships Euler with "leading" spacing.
SDXL_BASE_SCHEDULER = dict(beta_start=SD_SCHEDULER["beta_start"], beta_end=SD_SCHEDULER["beta_end"],
                           beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> str:
    """A tiny random SDXL shipped, as SDXL base is, with an Euler scheduler spaced 'leading'."""
    return save_random_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl-base"),
                                  scheduler=EulerDiscreteScheduler(**SDXL_BASE_SCHEDULER))


@pytest.fixture(scope="module")
def lightning_unet(tmp_path_factory) -> str:
    """A tiny "sdxl_lightning_4step_unet.safetensors": the base's UNet config with other (random) weights, saved as
    a whole-UNet state dict in diffusers' layout, as ByteDance ships it."""
    torch.manual_seed(7)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    path = str(tmp_path_factory.mktemp("lightning") / "sdxl_lightning_4step_unet.safetensors")
    save_file({name: tensor.contiguous() for name, tensor in unet.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_euler_trailing_is_diffusers_trailing_euler_whatever_the_base_config_says(sdxl_base, steps):
    from backend.engine.generation import check_steps, make_scheduler

    config = StableDiffusionXLPipeline.from_pretrained(sdxl_base).scheduler.config
    assert config.timestep_spacing == "leading"
    ours = make_scheduler("euler-trailing", config)
    # What SDXL-Lightning's model card builds: EulerDiscreteScheduler.from_config(..., timestep_spacing="trailing").
    reference = EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    check_steps(ours, steps)
    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    assert type(ours) is EulerDiscreteScheduler and ours.config.timestep_spacing == "trailing"
    torch.testing.assert_close(ours.timesteps, reference.timesteps)
    torch.testing.assert_close(ours.sigmas, reference.sigmas)
    assert float(ours.timesteps[0]) == 999  # trailing: the first step starts from pure noise
    leading = EulerDiscreteScheduler.from_config(config)
    leading.set_timesteps(steps)
    assert float(leading.timesteps[0]) < 999  # the base's own spacing would not
    sample = make_scheduler("euler-trailing-sample", config)
    sample.set_timesteps(steps)
    assert sample.config.prediction_type == "sample" and torch.equal(sample.timesteps, ours.timesteps)


@pytest.mark.parametrize("scheduler,steps,settings", [
    ("euler-trailing", 4, dict(timestep_spacing="trailing")),
    ("euler-trailing-sample", 1, dict(timestep_spacing="trailing", prediction_type="sample")),  # the 1-step UNet's
], ids=["4-step", "1-step-sample"])
def test_lightning_unet_file_matches_sdxl_pipeline_with_its_unet_and_trailing_euler(sdxl_base, lightning_unet, tmp_path,
                                                                                   scheduler, steps, settings):
    # The model card's recipe: the base pipeline, the UNet's weights loaded, Euler from_config with its settings.
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_base, add_watermarker=False)
    reference.unet.load_state_dict(load_file(lightning_unet))
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config, **settings)
    request = GenerateRequest(prompt="a mountain lake at dawn", layout="wide", width=128, height=128, steps=steps,
                              guidance=0.0, seed=1234, model=sdxl_base, unet_file=lightning_unet,
                              scheduler=scheduler, device="cpu", out=str(tmp_path / "ours"))
    outputs = assert_single_window_matches_the_pipeline(reference, request, None)
    metadata = json.loads(open(outputs["metadata"]).read())
    # One UNet row per view and step: no unconditional pass.
    assert metadata["scheduler"] == "EulerDiscreteScheduler" and metadata["unet_rows"] == steps * metadata["views"] == steps


def test_a_four_step_lightning_world_and_tile_run_from_the_cli(sdxl_base, lightning_unet, tmp_path, capsys):
    from backend.app.cli import main

    lora = save_random_lora(str(tmp_path / "lightning-lora"), sdxl_base)
    common = ["generate", "--prompt", "a canyon", "--model", sdxl_base, "--scheduler", "euler-trailing", "--seed", "3",
              "--device", "cpu"]
    # The whole-UNet route for a world, the LoRA route for a tile; --steps and --guidance left to the scheduler.
    assert main([*common, "--unet-file", lightning_unet, "--layout", "equirect", "--width", "384", "--height", "192",
                 "--out", str(tmp_path / "world")]) == 0
    assert main([*common, "--lora", lora, "--layout", "tile", "--width", "128", "--height", "128",
                 "--out", str(tmp_path / "tile")]) == 0
    assert "warning" not in capsys.readouterr().err
    for name, shape in (("world", (192, 384, 3)), ("tile", (128, 128, 3))):
        metadata = json.loads((tmp_path / name / "metadata.json").read_text())
        assert (metadata["params"]["steps"], metadata["params"]["guidance"]) == (4, 0.0)
        assert metadata["scheduler"] == "EulerDiscreteScheduler" and metadata["unet_rows"] == 4 * metadata["views"]
        image = np.asarray(Image.open(tmp_path / name / "panorama.png"))
        assert image.shape == shape and image.std() > 1
    assert json.loads((tmp_path / "world" / "metadata.json").read_text())["params"]["unet_file"] == lightning_unet


def test_guidance_with_euler_trailing_is_one_warning_sentence(sdxl_base, tmp_path, capsys):
    request = GenerateRequest(prompt="a canyon", layout="wide", width=128, height=128, steps=4, guidance=7.5,
                              scheduler="euler-trailing", model=sdxl_base, device="cpu", out=str(tmp_path / "out"))
    check_request(request)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: --guidance 7.5 with --scheduler euler-trailing") and line.endswith("--guidance 0")


@pytest.mark.parametrize("make,message", [
    (lambda tmp: (tmp / "unet.bin").write_bytes(b"x") and str(tmp / "unet.bin"), "as a .safetensors file, not 'unet.bin'"),
    (lambda tmp: (tmp / "unet.ckpt").write_bytes(b"x") and str(tmp / "unet.ckpt"), "not 'unet.ckpt' (pickled"),
    (lambda tmp: str(tmp / "missing.safetensors"), "does not exist"),
    (lambda tmp: (tmp / "cut.safetensors").write_bytes(b"\x40") and str(tmp / "cut.safetensors"),
     "is not a readable safetensors file"),
    (lambda tmp: save_file({"conv_in.weight": torch.zeros(1)}, str(tmp / "other.safetensors")) or str(tmp / "other.safetensors"),
     "do not fit this model's UNet"),
], ids=["bin", "ckpt", "missing", "truncated", "another-unet"])
def test_a_bad_unet_file_is_one_sentence_and_exit_2(sdxl_base, tmp_path, capsys, make, message):
    from backend.app.cli import main

    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", sdxl_base, "--unet-file", make(tmp_path), "--allow-pickle",
                 "--scheduler", "euler-trailing", "--layout", "wide", "--width", "128", "--height", "128",
                 "--device", "cpu", "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message in error and error.endswith(".")
    assert not (out / "panorama.png").exists()
