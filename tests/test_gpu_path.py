"""The GPU path (issue 17, item 5), tested by its pure parts on the CPU: the view batch chosen from free memory
(``memory.choose_view_batch``), ``--view-batch`` left out (None) through the CLI, the protocol and validation,
``--compile`` (its refusals; a compiled tiny-model job and its reuse through the model cache), channels_last
weights, and diffusers' scaled-dot-product attention processors (and MAD putting them back)."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from backend import protocol
from backend.app.cli import build_parser, main, request_from_args
from backend.app.job import check_request, run_job
from backend.engine import memory, models as models_module
from backend.engine.memory import (FIXED_VIEW_BATCH, HEADROOM, MAX_VIEW_BATCH, choose_view_batch, estimate_full_bytes,
                                   memory_attempts, plan_memory)
from backend.engine.models import ModelCache, use_channels_last
from backend.errors import BadRequest
from backend.request import GenerateRequest
from model_factory import TINY_UNET

# Stable Diffusion 2 base: the configs the estimate reads.
SD2_UNET = {"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280]}
SD2_VAE = {"block_out_channels": [128, 256, 512, 512]}
GIB = 2**30
WORLD_VIEWS = 130  # the dense 2048x1024 band+poles world


def world(**fields) -> GenerateRequest:
    """A validated 2048x1024 world request (no --view-batch unless given)."""
    return GenerateRequest(prompt="x", layout="equirect", width=2048, height=1024, out="/tmp/unused",
                           **fields).validated()


def choose(request, device_type="cuda", free=80 * GIB, view_count=WORLD_VIEWS, weights=0):
    return choose_view_batch(request, device_type, free, torch.float16, SD2_UNET, SD2_VAE, view_count, weights)


def estimate(request, batch, view_count=WORLD_VIEWS):
    return estimate_full_bytes(dataclasses.replace(request, view_batch=batch), torch.float16, SD2_UNET, SD2_VAE,
                               view_count)


# ------------------------------------------------------------------------------------------- the view batch
def test_a_roomy_gpu_runs_the_largest_batch_and_never_more_than_the_views():
    request = world()
    assert choose(request) == (MAX_VIEW_BATCH, "the largest batch (at most 16) whose estimate fits in the free memory")
    assert choose(request, view_count=5)[0] == 5  # a step of five views: a batch of five is all of them
    assert choose(request, view_count=1)[0] == 1


def test_a_tight_gpu_runs_the_largest_batch_that_fits():
    request = world()
    # Ten views fit with exactly the headroom to spare; eleven do not (the UNet call dominates the decode there).
    free = math.ceil(estimate(request, 10) / HEADROOM)
    assert estimate(request, 11) > HEADROOM * free >= estimate(request, 10) > estimate(request, 9)
    assert choose(request, free=free)[0] == 10
    # The weights a full job must still bring in take their share of the same free memory.
    weights = estimate(request, 10) - estimate(request, 8)
    assert choose(request, free=free, weights=weights)[0] == 8
    plan = plan_memory(request, torch.device("cuda"), torch.float16, SD2_UNET, SD2_VAE, WORLD_VIEWS, free_bytes=free)
    recorded = plan.to_dict()
    assert (recorded["mode"], recorded["view_batch"]) == ("full", 10)
    assert recorded["view_batch_reason"].startswith("the largest batch")
    assert recorded["estimated_full_mib"] == round(estimate(request, 10) / 2**20)


def test_a_gpu_that_fits_no_batch_runs_one_view_and_auto_then_plans_low():
    request = world()
    free = GIB  # below the decode tile alone (2.6 GiB in float16)
    assert choose(request, free=free) == (1, "not even one view's estimate fits in the free memory")
    cuda = torch.device("cuda")
    auto = plan_memory(request, cuda, torch.float16, SD2_UNET, SD2_VAE, WORLD_VIEWS, free_bytes=free)
    assert (auto.mode, auto.view_batch, auto.offload) == ("low", 1, True)
    full = plan_memory(dataclasses.replace(request, memory="full"), cuda, torch.float16, SD2_UNET, SD2_VAE, WORLD_VIEWS,
                       free_bytes=free)
    assert (full.mode, full.view_batch, full.reason) == ("full", 1, "asked for")


def test_the_cpu_mps_and_an_unknown_free_memory_keep_the_fixed_batch():
    request = world()
    for device_type in ("cpu", "mps"):
        assert choose(request, device_type, free=512 * GIB) == (FIXED_VIEW_BATCH, f"the fixed batch on the {device_type} device")
        assert choose(request, device_type, free=GIB)[0] == FIXED_VIEW_BATCH
    assert choose(request, free=None)[0] == FIXED_VIEW_BATCH == 4
    plan = plan_memory(request, torch.device("cpu"), torch.float32, SD2_UNET, SD2_VAE, WORLD_VIEWS, free_bytes=512 * GIB)
    assert (plan.mode, plan.view_batch, plan.view_batch_reason) == ("full", 4, "the fixed batch on the cpu device")


def test_an_explicit_view_batch_is_kept_and_low_memory_runs_one_view():
    assert choose(world(view_batch=7), free=GIB) == (7, "asked for")  # respected even where it may not fit
    assert choose(world(view_batch=7), "cpu") == (7, "asked for")
    assert choose(world(memory="low"))[0] == 1
    assert choose(world(memory="low", view_batch=7))[0] == 1  # low mode's batch, as before
    plan = plan_memory(world(memory="low"), torch.device("cuda"), torch.float16, SD2_UNET, SD2_VAE, WORLD_VIEWS)
    assert (plan.mode, plan.view_batch) == ("low", 1)


def test_out_of_memory_still_halves_a_chosen_batch():
    request = world()
    plan = plan_memory(request, torch.device("cuda"), torch.float16, SD2_UNET, SD2_VAE, WORLD_VIEWS, free_bytes=80 * GIB)
    attempts = memory_attempts(request, plan, torch.device("cuda"))
    assert [(name, attempt.view_batch) for name, attempt in attempts] == [("full", 16), ("half view batch", 8), ("low", 1)]
    assert attempts[1][1].view_batch_reason == "half the batch that ran out of memory"


def test_the_estimate_needs_a_decided_batch_and_the_size_check_decides_it():
    with pytest.raises(ValueError, match="decided view batch"):
        estimate_full_bytes(world(), torch.float16, SD2_UNET, SD2_VAE, WORLD_VIEWS)
    # check_job_fits reads the view batch before any plan: on the CPU a full job is checked with the fixed batch.
    request = GenerateRequest(prompt="x", layout="wide", width=2048, height=512, memory="full", device="cpu",
                              out="/tmp/unused").validated()
    memory.check_job_fits(request, torch.device("cpu"), torch.float32, SD2_UNET, SD2_VAE, 0, free_host_bytes=64 * GIB)


# ---------------------------------------------------------------------------------- None through every door
def test_a_missing_view_batch_is_none_through_the_cli_the_protocol_and_validation():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--out", "/tmp/unused"])
    assert request_from_args(args).view_batch is None
    assert request_from_args(build_parser().parse_args(
        ["generate", "--prompt", "x", "--out", "/tmp/unused", "--view-batch", "3"])).view_batch == 3
    for params in ({"prompt": "x"}, {"prompt": "x", "view_batch": None}):
        line = protocol.encode(protocol.generate_request("job", params, "/tmp/unused"))
        request = GenerateRequest.from_params({**protocol.parse_request(line)["params"], "out": "/tmp/unused"})
        assert request.view_batch is None and request.validated().view_batch is None
    with pytest.raises(BadRequest, match="^--view-batch must be at least 1, not 0.$"):
        GenerateRequest(prompt="x", view_batch=0, out="/tmp/unused").validated()


def test_a_job_without_a_view_batch_records_the_chosen_one(tiny_model, tmp_path):
    request = GenerateRequest(prompt="a harbour", layout="wide", width=256, height=128, window=16, stride=8, steps=1,
                              seed=1, model=tiny_model, device="cpu", out=str(tmp_path / "out"))
    metadata = json.loads(open(run_job(check_request(request))["metadata"]).read())
    assert metadata["params"]["view_batch"] is None  # what was asked for
    assert {key: metadata["memory"][key] for key in ("view_batch", "view_batch_reason", "view_batch_used")} == {
        "view_batch": 4, "view_batch_reason": "the fixed batch on the cpu device", "view_batch_used": 4}


# -------------------------------------------------------------------------------------------------- --compile
@pytest.mark.parametrize("args,sentence", [
    (["--mad-steps", "2"], "--compile cannot go with --mad-steps: merged attention swaps the UNet's attention "
                           "processors during the job, which the compiled UNet does not see; leave one of them out."),
    (["--sync", "syncdiffusion"], "--compile cannot go with --sync syncdiffusion, whose guidance backpropagates "
                                  "through the UNet and the compiled UNet is built for inference only; leave one of "
                                  "them out."),
])
def test_compile_with_a_method_that_changes_the_unet_is_one_sentence_and_exit_2(tiny_model, tmp_path, capsys, args,
                                                                                 sentence):
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--device", "cpu", "--compile", "--out", str(out),
                 *args])
    assert code == 2 and capsys.readouterr().err.strip() == f"error: {sentence}"
    assert not out.exists()


def _image(outputs) -> np.ndarray:
    return np.asarray(Image.open(outputs["png"]), dtype=np.int16)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile's CPU backend (Inductor) builds C++ kernels and this machine has no C compiler")
def test_a_compiled_job_gives_the_same_image_and_the_next_job_reuses_the_compiled_unet(tiny_model, tmp_path):
    from torch._dynamo.utils import counters

    cache = ModelCache()
    # One 32-latent view (two UNet rows) per step: one graph to compile, the cheapest job that runs the UNet.
    settings = dict(prompt="a harbour", layout="wide", width=256, height=256, steps=2, seed=5, model=tiny_model,
                    device="cpu")
    plain = run_job(check_request(GenerateRequest(**settings, out=str(tmp_path / "plain"))), models=cache)
    compiled = run_job(check_request(GenerateRequest(**settings, compile=True, out=str(tmp_path / "compiled"))),
                       models=cache)
    model = cache.get(check_request(GenerateRequest(**settings, out=str(tmp_path / "unused"))))
    assert isinstance(model.compiled_unet, torch._dynamo.eval_frame.OptimizedModule)
    assert model.compiled_unet._orig_mod is model.pipeline.unet  # the same weights
    graphs = counters["stats"]["unique_graphs"]
    again = run_job(check_request(GenerateRequest(**{**settings, "seed": 6}, compile=True, out=str(tmp_path / "again"))),
                    models=cache)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again: the cached compiled UNet ran
    assert cache.get(check_request(GenerateRequest(**settings, out=str(tmp_path / "unused")))) is model
    # Inductor may fuse and reorder float operations: within 2/255 of the plain job.
    assert np.abs(_image(compiled) - _image(plain)).max() <= 2
    first, second = (json.loads(open(outputs["metadata"]).read()) for outputs in (compiled, again))
    assert first["params"]["compile"] is True and first["compile"] == {"mode": "default", "reused": False}
    assert second["compile"] == {"mode": "default", "reused": True}
    assert "compile" not in json.loads(open(plain["metadata"]).read())


# ---------------------------------------------------------------------------------- channels_last, attention
def test_channels_last_weights_give_the_same_unet_output():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    latents, states = torch.randn(3, 4, 32, 32), torch.randn(3, 7, TINY_UNET["cross_attention_dim"])
    with torch.no_grad():
        expected = unet(latents, torch.tensor(500), encoder_hidden_states=states).sample
        use_channels_last(unet)
        weight = unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        unet.to("cpu")  # a move (the model cache parks models in CPU memory) keeps the format
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        result = unet(latents, torch.tensor(500), encoder_hidden_states=states).sample
    assert (result - expected).abs().max() < 1e-5


def test_a_job_with_channels_last_models_gives_the_same_image(tiny_model, tmp_path, monkeypatch):
    # CUDA's path on the CPU: load_model stores the UNet and VAE channels_last; the loop, fusion and the tiled
    # and strip decodes must take the NHWC tensors that come out of them.
    settings = dict(prompt="a canyon", layout="equirect", width=512, height=256, steps=2, seed=3, window=16, stride=8,
                    model=tiny_model, device="cpu", no_hdr=True)
    plain = run_job(check_request(GenerateRequest(**settings, out=str(tmp_path / "plain"))), models=ModelCache())
    monkeypatch.setattr(models_module, "CHANNELS_LAST_DEVICES", ("cuda", "cpu"))
    cache = ModelCache()
    outputs = {mode: run_job(check_request(GenerateRequest(**settings, memory=mode, out=str(tmp_path / mode))),
                             models=cache) for mode in ("full", "low")}
    unet = cache.get(check_request(GenerateRequest(**settings, out=str(tmp_path / "unused")))).pipeline.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for mode in ("full", "low"):
        assert np.abs(_image(outputs[mode]) - _image(plain)).max() <= 1, mode


def test_attention_runs_through_scaled_dot_product_attention_and_mad_puts_it_back(tiny_model, tmp_path):
    cache = ModelCache()
    settings = dict(prompt="a harbour", layout="wide", width=256, height=128, window=16, stride=8, steps=2, seed=1,
                    model=tiny_model, device="cpu")
    model = cache.get(check_request(GenerateRequest(**settings, out=str(tmp_path / "unused"))))
    unet_processors = dict(model.pipeline.unet.attn_processors)
    processors = [*unet_processors.values(), *model.pipeline.vae.attn_processors.values()]
    assert processors and all(type(processor) is AttnProcessor2_0 for processor in processors)
    run_job(check_request(GenerateRequest(**settings, mad_steps=1, out=str(tmp_path / "mad"))), models=cache)
    after = model.pipeline.unet.attn_processors  # MAD replaced them for its steps and put the same objects back
    assert after.keys() == unet_processors.keys()
    assert all(after[name] is processor for name, processor in unet_processors.items())


def test_the_gpu_defaults_are_half_precision_and_channels_last_and_compile_stays_opt_in():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert models_module.resolve_dtype("auto", cuda) is torch.float16
    assert models_module.resolve_dtype("auto", cpu) is torch.float32
    assert models_module.CHANNELS_LAST_DEVICES == ("cuda",)
    defaults = GenerateRequest(prompt="x")
    assert defaults.compile is False and defaults.view_batch is None
