"""One generation: check the request, load the model, sample, decode, write. The CLI and the server call it.

``check_request`` runs every check that needs no weights (the CLI calls it before anything loads);
``run_job`` does the work and reports stages through the same callback the denoising loop uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import os
import platform
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import __version__
from ..sphere.canvas import Canvas
from ..engine.decode import decode_canvas, decode_pole_caps
from ..engine.denoiser import GuidedUNetDenoiser
from ..errors import BadRequest, JobCancelled, OutOfMemory
from ..engine.memory import MemoryPlan, StagePlacement, low_plan, plan_memory, plan_request, weights_to_place
from ..engine.models import (
    LoadedModel,
    fuse_lora,
    hub_offline,
    read_unet_config,
    resolve_lora_source,
    ModelSource,
    load_model,
    load_tiny_autoencoder,
    read_model_geometry,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from ..products.files import check_output_folder
from ..products.images import srgb_to_linear
from ..products.outputs import job_output_names, write_job_outputs
from ..engine.perceptual import load_perceptual_loss
from ..request import DEFAULT_VIEW_SET, POLE_FACE_VIEW_SETS, SCHEDULERS, UP_DOWN_PITCH, GenerateRequest
from ..engine.sampler import StepReport, sample_canvas
from ..engine.sync.syncdiffusion import SyncDiffusionGuidance, ring_anchor_indices
from ..engine.sync.mad import MergedAttention, block_divisors, check_mad
from ..engine.sync.syncsde import SyncSDE
from ..sphere.view_sets import CanvasViews, band_rows, canvas_views


@dataclass
class CheckedRequest:
    """A validated request and what was resolved for it without loading weights."""

    request: GenerateRequest
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    lora: ModelSource | None = None


def check_request(request: GenerateRequest) -> CheckedRequest:
    """Validate ``request`` (fills defaults in place) and resolve model source, device and dtype.

    Reads only config files. Raises BadRequest or ModelNotFound with one sentence.
    """
    request.validate()
    request.out = check_output_folder(request.out, job_output_names(request.layout), request.overwrite)
    source = resolve_model_source(request.model, request.allow_pickle)
    lora = resolve_lora_source(request.lora, request.allow_pickle) if request.lora else None
    unet_config = read_unet_config(source)
    geometry = read_model_geometry(source, unet_config)
    if geometry is not None:
        request.validate_for_model(geometry)
        views = request_views(request, geometry.vae_scale_factor, unet_config)
        view_prompt_rows(request, views)
        if request.sync == "syncdiffusion":
            sync_anchors(request, views)
    import diffusers

    if request.scheduler != "auto" and not hasattr(diffusers, SCHEDULERS.get(request.scheduler) or request.scheduler):
        raise BadRequest(f"diffusers {diffusers.__version__} has no scheduler named {request.scheduler}.")
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise BadRequest("float16 is not supported on the CPU; use --dtype float32 or --dtype auto.")
    return CheckedRequest(request, source, device, dtype, lora)


class ModelCache:
    """Keeps the last loaded model so consecutive jobs with the same model skip loading (the server)."""

    def __init__(self):
        self._key = None
        self._model: LoadedModel | None = None

    def get(self, checked: CheckedRequest) -> LoadedModel:
        """The model for ``checked``: the cached one when source, device, dtype and config match."""
        request = checked.request
        key = (checked.source, checked.device, checked.dtype, request.allow_pickle, request.model_config,
               checked.lora, request.lora_scale)
        if key != self._key:
            self._model = None  # release the old model before loading the next one
            # A low-memory job on a GPU loads the models into CPU memory; each stage moves in what it runs.
            on_device = request.memory != "low" or checked.device.type == "cpu"
            self._model = load_model(checked.source, checked.device, checked.dtype, request.allow_pickle, request.model_config,
                                     place_on_device=on_device)
            if checked.lora is not None:
                fuse_lora(self._model, checked.lora, request.lora_scale)
            self._key = key
        return self._model


def make_scheduler(name: str, config):
    """A diffusers scheduler of the class named by ``name`` (a SCHEDULERS key or class name) from ``config``
    (the model's scheduler config). ``auto``: the model's own class when it is a few-step sampler (an
    ``LCMScheduler``, or ``trailing`` timestep spacing as SD-Turbo ships), else DDIM."""
    import diffusers

    if name == "auto":
        own = config.get("_class_name", "")
        name = own if own == "LCMScheduler" or config.get("timestep_spacing") == "trailing" else "ddim"
    return getattr(diffusers, SCHEDULERS.get(name) or name).from_config(config)


def run_job(checked: CheckedRequest, report: StepReport | None = None, models: ModelCache | None = None) -> dict:
    """Run one generation and write its files. Returns the written paths ({"png", "exr", "metadata"}, and for
    equirect jobs the cube map's {"faces": {"F": …}, "dice", "horizon"}, and unless --no-hdr the HDR
    lighting's {"exr_sky", "lighting"}: ``outputs.write_job_outputs``). The HDR step (``hdr.make_hdr`` on
    the decoded image) runs in the writing stage; metadata.json records it under "hdr".

    ``report(stage, step, total, preview)`` is called for stages loading, denoising (every step),
    decoding and writing; returning True stops the job with JobCancelled. Nothing is written unless the
    job completes. Raises BadRequest, ModelNotFound, OutOfMemory or JobCancelled.

    ``--memory`` decides how the job uses memory (``memory.plan_memory``: full, low, or auto from the free
    memory). When the device runs out of memory while denoising or decoding anyway, the job starts again
    from the same seed with half the view batch, then in low mode with MAD off (``memory_attempts``),
    releasing the failed attempt's memory in between; the denoising steps are reported again from step 1.
    OutOfMemory is raised only when the last attempt fails too. metadata.json records it under "memory":
    the plan that succeeded (``MemoryPlan.to_dict``: requested, mode, reason, view_batch, offload,
    strip_decode, free_mib, estimated_full_mib), its "attempt" name, "retries" (each failed attempt's
    view_batch and mad_steps, "reason", and the "next" attempt) and "view_batch_used"; "params" keep the
    view batch asked for.
    """
    request = checked.request
    report = report or (lambda *args: None)
    timings = {}
    started = time.perf_counter()

    def stage(name: str) -> None:
        if report(name, 0, 1, None):
            raise JobCancelled(f"The job was cancelled while {name}.")

    download_if_needed(checked, report)
    stage("loading")
    model = (models or ModelCache()).get(checked)
    pipeline, geometry = model.pipeline, model.geometry
    request.validate_for_model(geometry)  # single-file checkpoints only know their geometry now
    if request.seed is None:
        request.seed = secrets.randbelow(2**32)
    timings["loading_s"] = time.perf_counter() - started

    # --memory: full or low (auto picks from the free memory); when the device runs out of memory anyway,
    # retry with half the view batch, then in low mode with MAD off, then fail (memory_attempts).
    plan = plan_memory(request, model.device, model.dtype, pipeline.unet.config, pipeline.vae.config,
                       len(request_views(dataclasses.replace(request), geometry.vae_scale_factor, pipeline.unet)),
                       weights_bytes=weights_to_place(pipeline, model.device), vae_dtype=pipeline.vae.dtype)
    attempts = memory_attempts(request, plan, model.device)
    retries = []
    hook = install_test_oom_hook(pipeline.unet)
    try:
        for number, (attempt_name, attempt_plan, attempt) in enumerate(attempts):
            try:
                image, canvas, details, attempt_timings = denoise_and_decode(attempt, model, attempt_plan, report, stage)
                break
            except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError; others are re-raised
                if not is_out_of_memory(error, model.device):
                    raise
                if number + 1 == len(attempts):
                    raise OutOfMemory(out_of_memory_message(attempt, model)) from error
                retries.append({"view_batch": attempt.view_batch, "mad_steps": attempt.mad_steps,
                                "reason": "out of memory", "next": attempts[number + 1][0]})
                print(f"warning: the {model.device} device ran out of memory with --view-batch {attempt.view_batch}; "
                      f"retrying ({attempts[number + 1][0]})", file=sys.stderr)
            # Outside the except block, so the failed attempt's traceback (and the tensors its frames held)
            # is already dropped when the memory is released.
            release_memory(model.device)
    finally:
        if hook is not None:
            hook.remove()  # the UNet is cached between jobs
    timings.update(attempt_timings)
    request.views = attempt.views  # request_views may have chosen the view set on the attempt's copy
    memory = {**attempt_plan.to_dict(), "attempt": attempt_name, "retries": retries, "view_batch_used": attempt.view_batch}
    if attempt.mad_steps != request.mad_steps:
        memory["mad_off"] = True  # low mode runs one view at a time; MAD would batch them all
        print("warning: merged attention (--mad-steps) was off: low-memory mode runs one view at a time", file=sys.stderr)

    stage("writing")
    hdr = None
    if request.hdr:
        from ..products.hdr import make_hdr

        hdr = make_hdr(srgb_to_linear(image), request.exposure, request.sun_ratio, request.sun_strength,
                       request.sun_direction, request.half)
        timings["hdr_s"] = hdr.details["seconds"]
    timings["total_s"] = time.perf_counter() - started
    metadata = {
        "params": request.to_dict(),
        "seed": request.seed,
        "model": {"id": request.model, "kind": model.source.kind, **vars(geometry)},
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "canvas": {"kind": canvas.kind, "latent_height": canvas.height, "latent_width": canvas.width},
        "sync": request.sync,
        **details,
        "memory": memory,
        "timings": timings,
        "versions": package_versions(),
    }
    if hdr is not None:
        metadata["hdr"] = hdr.details
    return write_job_outputs(request.out, image, metadata, cube_map=request.cube_map, hdr=hdr, half=request.half)


def download_if_needed(checked: CheckedRequest, report: StepReport) -> None:
    """Before loading a hub model that is not completely in the cache, download what the engine loads
    (``model_manager.download_model``), reporting stage "downloading" with bytes done and total as step and
    total; returning True from ``report`` cancels (JobCancelled). Offline, a model missing from the cache is
    left to the loader, whose error names the model and how to point at a local folder."""
    from ..engine.model_manager import download_model, is_cached

    if checked.source.kind != "hub" or hub_offline() or is_cached(checked.source.location):
        return
    download_model(checked.source.location, progress=lambda done, total, name: report("downloading", done, total, None))


def denoise_and_decode(request: GenerateRequest, model: LoadedModel, plan: MemoryPlan, report: StepReport,
                       stage: Callable[[str], None]):
    """One attempt at a job's image with the memory ``plan``: ``denoise`` from the seed's noise, then decode.
    Returns (image as an (H, W, 3) float array, canvas, details, {"denoising_s", "decoding_s"});
    ``stage(name)`` reports the decoding stage (and raises JobCancelled). Keeps nothing between calls, so a
    retry starts from scratch."""
    pipeline = model.pipeline
    placement = StagePlacement(pipeline, model.device, plan.offload,
                               vae_while_denoising=request.sync == "syncdiffusion" and request.sync_decoder == "vae")
    latents, canvas, details = denoise(request, model, report, placement)
    timings = {"denoising_s": details.pop("seconds")}
    stage("decoding")
    began = time.perf_counter()
    placement.enter("decode")
    image = decode_canvas(pipeline.vae, latents, canvas, in_strips=plan.strip_decode)
    if request.views in POLE_FACE_VIEW_SETS:
        image = decode_pole_caps(pipeline.vae, latents, image, in_strips=plan.strip_decode)
    image = image[0].permute(1, 2, 0).numpy()
    timings["decoding_s"] = time.perf_counter() - began
    return image, canvas, details, timings


def memory_attempts(request: GenerateRequest, plan: MemoryPlan, device: torch.device) -> list[tuple[str, MemoryPlan, GenerateRequest]]:
    """The attempts a job makes when the device runs out of memory, in order, as (name, memory plan, request
    copy for the plan: ``plan_request``): "full" or "low", the ``plan`` as given; after a full plan with a
    view batch above 1, "half view batch"; after a full plan, "low" (view batch 1, MAD off). The copies share
    the seed, so each attempt starts from the same noise."""
    attempts = [(plan.mode, plan, plan_request(request, plan))]
    if plan.mode == "full" and plan.view_batch > 1:
        half = dataclasses.replace(plan, view_batch=max(1, plan.view_batch // 2), reason="out of memory")
        attempts.append(("half view batch", half, plan_request(request, half)))
    if plan.mode == "full":
        low = dataclasses.replace(low_plan(request, device, "out of memory"), free_bytes=plan.free_bytes,
                                  estimated_full_bytes=plan.estimated_full_bytes)
        attempts.append(("low", low, plan_request(request, low)))
    return attempts


def is_out_of_memory(error: BaseException, device: torch.device) -> bool:
    """Whether ``error`` is ``device`` running out of memory: torch.OutOfMemoryError (CUDA and the CPU
    allocator), or on Apple's MPS the plain RuntimeError whose message says "out of memory"."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return device.type == "mps" and type(error) is RuntimeError and "out of memory" in str(error).lower()


def release_memory(device: torch.device) -> None:
    """Free what a failed attempt held: collect its reference cycles, then return the device's cached
    blocks to the driver so the next attempt can allocate them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def out_of_memory_message(request: GenerateRequest, model: LoadedModel) -> str:
    """The one sentence of the OutOfMemory a job raises after its last attempt (``request``) failed too."""
    advice = "lower the canvas size (--width, --height) or --window"
    if model.device.type != "cpu" and model.dtype != torch.float16:
        advice += ", or use --dtype float16"
    if request.sync == "syncdiffusion":
        advice += ", or add --sync-checkpointing or --sync-decoder taesd for SyncDiffusion's gradient pass"
    return (f"The {model.device} device ran out of memory even with --view-batch {request.view_batch} "
            f"and MAD off; {advice}.")


TEST_OOM_VARIABLE = "SYNCSPHERE_TEST_OOM"
_test_oom_calls = 0  # UNet calls the test hook has seen in this process


def install_test_oom_hook(unet: torch.nn.Module):
    """TEST HOOK, not for users: when the environment variable ``SYNCSPHERE_TEST_OOM`` is set, make the
    UNet raise torch.OutOfMemoryError as a device that ran out of memory would: "first": only the first
    UNet call of this process; "always": every call. Returns the forward pre-hook's handle (remove it when
    the job ends: the UNet is cached), or None when the variable is unset, so production runs are untouched.
    A worker subprocess inherits the variable."""
    mode = os.environ.get(TEST_OOM_VARIABLE)
    if not mode:
        return None
    if mode not in ("first", "always"):
        raise BadRequest(f"{TEST_OOM_VARIABLE} must be first or always, not {mode}.")

    def raise_out_of_memory(module, args):
        global _test_oom_calls
        _test_oom_calls += 1
        if mode == "always" or _test_oom_calls == 1:
            raise torch.OutOfMemoryError(f"{TEST_OOM_VARIABLE}={mode}: simulated out of memory (test hook).")

    return unet.register_forward_pre_hook(raise_out_of_memory)


def denoise(request: GenerateRequest, model: LoadedModel, report: StepReport, placement: StagePlacement | None = None):
    """Sample the canvas latent with the request's views, fusion and synchronisation; returns (latents,
    canvas, details): details has "views" (how many), "view_set", "fusion", "scheduler", "seconds", with
    per-direction prompts "view_prompts", and for SyncDiffusion "syncdiffusion" (anchors, loss, its trunk,
    decoder, guided steps). ``placement`` moves the models for the text and denoising stages (None: they
    stay where they are). The benchmarks call it too."""
    placement = placement or StagePlacement(model.pipeline, model.device, offload=False)
    pipeline, geometry = model.pipeline, model.geometry
    views = request_views(request, geometry.vae_scale_factor, pipeline.unet)
    canvas = views.canvas
    scheduler = make_scheduler(request.scheduler, pipeline.scheduler.config)
    began = time.perf_counter()
    uses_guidance = request.guidance > 1.0
    prompts, view_prompts = view_prompt_rows(request, views)
    placement.enter("text")
    prompt_embeds, negative_embeds = pipeline.encode_prompt(
        prompts, model.device, 1, uses_guidance, [request.negative_prompt] * len(prompts) if request.negative_prompt else None
    )
    negative_embeds = negative_embeds[:1] if negative_embeds is not None else None
    denoiser = GuidedUNetDenoiser(pipeline.unet, prompt_embeds, negative_embeds, request.guidance,
                                  view_prompts if len(prompts) > 1 else None)
    shape = (1, geometry.latent_channels, canvas.height, canvas.width)
    noise = initial_noise(request.seed, shape, model.device, model.dtype)
    fusion = request.resolved_fusion
    projected_noise = None
    if fusion in ("clean", "own") and views.projected:
        # Each projected view's own noise, from the seed too (seed + 1 belongs to stochastic samplers).
        projected_noise = initial_noise(request.seed + 2, (len(views.projected), geometry.latent_channels, views.size, views.size),
                                        model.device, model.dtype)
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        # Stochastic samplers (ancestral, SDE) draw their per-step noise from the seed too.
        step_kwargs["generator"] = torch.Generator("cpu").manual_seed(request.seed + 1)
    guidance, sync_details, differentiated, synchroniser = None, {}, [], None
    if request.sync == "syncdiffusion":
        guidance, sync_details, differentiated = syncdiffusion_guidance(request, model, views, denoiser)
    if request.sync == "syncsde":
        synchroniser = SyncSDE(views, request.syncsde_lambda, closed_loop=not request.syncsde_open_chain,
                               compose=request.syncsde_compose)
    merged_attention = None
    if request.mad_steps:
        merged_attention = MergedAttention(pipeline.unet, views, request.mad_steps, request.mad_blocks)
    predict = denoiser
    if merged_attention is not None:
        # The processors must know which views each batch holds; the gradient pass's chunks too.
        predict = merged_attention.wrap(denoiser)
        if guidance is not None:
            guidance.predict = merged_attention.wrap(guidance.predict)
    placement.enter("denoise")
    # The with-blocks put the cached UNet back as it was, even when the job fails or is cancelled.
    checkpointed = differentiated if request.sync_checkpointing else []
    with merged_attention or contextlib.nullcontext(), gradient_checkpointing(checkpointed):
        latents = sample_canvas(
            predict, scheduler, views, noise, request.steps, request.view_batch, report, step_kwargs, guidance,
            fusion, projected_noise, synchroniser, merged_attention,
        )
    if guidance is not None:
        sync_details["guided_steps"] = guidance.guided_steps
    details = {"views": len(views), "view_set": request.views, "fusion": fusion,
               "scheduler": type(scheduler).__name__, "seconds": time.perf_counter() - began}
    if len(prompts) > 1:
        details["view_prompts"] = {label: prompts[row] for label, row in zip(views.labels, view_prompts) if row}
    if sync_details:
        details["syncdiffusion"] = sync_details
    if synchroniser is not None:
        details["syncsde"] = synchroniser.details()
    if merged_attention is not None:
        details["mad"] = {"steps": request.mad_steps, "blocks": list(merged_attention.blocks)}
    return latents, canvas, details


def request_views(request: GenerateRequest, vae_scale_factor: int, unet=None) -> CanvasViews:
    """The canvas and views of ``request`` (sizes checked against the model): ``view_sets.canvas_views``.

    Without ``--views`` an equirect job uses ``band+poles`` when its canvas is tall enough for a row of
    windows between ±60°, else ``band`` (docs/engine.md, "View sets"), and records the choice in
    ``request.views``. With ``--mad-steps``, ``unet`` (the model or its config; None: not checked yet)
    decides the feature resolutions MAD merges at: band+poles' rows are aligned to them and the views are
    checked to divide (``sync.mad.check_mad``). Raises BadRequest with one sentence when the view set does
    not fit the canvas or MAD cannot merge it.
    """
    canvas = Canvas(request.layout, request.height // vae_scale_factor, request.width // vae_scale_factor)
    divisors = block_divisors(unet, request.mad_blocks) if request.mad_steps and unet is not None else {}
    row_multiple = max(divisors.values(), default=1)
    if request.layout == "equirect" and request.views is None:
        first, stop = band_rows(canvas.height, row_multiple=row_multiple)
        request.views = DEFAULT_VIEW_SET if stop - first >= request.window else "band"
    try:
        views = canvas_views(canvas, request.views, request.window, request.stride, row_multiple)
        if divisors:
            check_mad(unet, views, request.mad_blocks)
        return views
    except ValueError as error:
        raise BadRequest(str(error)) from None


SUN_PROMPT = "the sun"
"""Added to the prompt (", " between) of every view that sees ``--sun-direction``."""


def view_prompt_rows(request: GenerateRequest, views: CanvasViews) -> tuple[list[str], list[int]]:
    """The distinct prompts of a job and each view's row among them: ([prompt, prompt + up, prompt + down],
    one row per view). A view whose centre is at least ``UP_DOWN_PITCH`` above the horizon gets
    ``--prompt-up`` added to the prompt (", " between), one as far below gets ``--prompt-down``, as
    MVDiffusion conditions each view on its own text. Then every view that sees ``--sun-direction``
    (``CanvasViews.seeing``) gets ``SUN_PROMPT`` added to its prompt, each such prompt a row after those. Without
    any of these: ([prompt], all 0); row 0 is always the prompt itself.
    Raises BadRequest when a per-direction prompt is given but no view looks that way."""
    prompts, rows = direction_prompt_rows(request, views)
    if request.sun_direction is not None:
        for index in views.seeing(*request.sun_direction):
            text = f"{prompts[rows[index]]}, {SUN_PROMPT}"
            if text not in prompts:
                prompts.append(text)
            rows[index] = prompts.index(text)
    return prompts, rows


def direction_prompt_rows(request: GenerateRequest, views: CanvasViews) -> tuple[list[str], list[int]]:
    """``view_prompt_rows`` for --prompt-up and --prompt-down alone: ([prompt, prompt + up, prompt + down], rows)."""
    prompts, rows = [request.prompt], [0] * len(views)
    if not (request.prompt_up or request.prompt_down):
        return prompts, rows
    pitches = [pitch for _, pitch in views.centres()]
    for flag, extra, looks in (("--prompt-up", request.prompt_up, lambda pitch: pitch >= UP_DOWN_PITCH),
                               ("--prompt-down", request.prompt_down, lambda pitch: pitch <= -UP_DOWN_PITCH)):
        if not extra:
            continue
        chosen = [index for index, pitch in enumerate(pitches) if looks(pitch)]
        if not chosen:
            raise BadRequest(f"{flag} has no view to act on: no view of the {request.views} view set looks "
                             f"{UP_DOWN_PITCH:g}° or more {'up' if flag == '--prompt-up' else 'down'} on this canvas; "
                             "use --views band+poles, ring or cube.")
        prompts.append(f"{request.prompt}, {extra}")
        for index in chosen:
            rows[index] = len(prompts) - 1
    return prompts, rows


def syncdiffusion_guidance(request: GenerateRequest, model: LoadedModel, views: CanvasViews, denoiser: GuidedUNetDenoiser):
    """SyncDiffusion's guidance for a request with ``--sync syncdiffusion``.

    Returns (the guidance, what metadata.json records of it, the modules its gradient pass runs through).
    Raises BadRequest (an anchor that is not a view, a bad decoder) or ModelNotFound (decoder, loss trunk).
    """
    anchors = sync_anchors(request, views)
    if request.sync_decoder == "vae":
        decoder = model.pipeline.vae
    else:
        decoder = load_tiny_autoencoder(
            request.sync_decoder, model.device, model.dtype, model.geometry.latent_channels, request.allow_pickle
        )

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return decoder.decode((latents / decoder.config.scaling_factor).to(decoder.dtype)).sample

    # The loss network runs in float32: LPIPS divides by feature norms that underflow in float16.
    loss = load_perceptual_loss(
        request.sync_loss, model.device, request.sync_loss_backbone, request.sync_loss_size,
        scale=1e6 if request.sync_loss == "style" else 1.0,  # the supplementary's S.4 scaling of the style loss
    )
    if not loss.backbone.pretrained and request.sync_loss_backbone == "auto":
        print(f"warning: SyncDiffusion's loss uses a {loss.backbone.describe()} trunk; the guidance follows "
              "random features instead of perceptual ones", file=sys.stderr)
    guidance = SyncDiffusionGuidance(
        predict=denoiser.predict, decode=decode, loss=loss, weight=request.sync_weight, decay=request.sync_decay,
        steps=request.sync_steps, every=request.sync_every, anchors=anchors, chunk=request.view_batch,
        reuse_prediction=request.sync_reuse_eps,
    )
    details = {
        "anchors": sorted(set(anchors)),
        "loss": request.sync_loss,
        "loss_backbone": loss.backbone.describe(),
        "loss_pretrained": loss.backbone.pretrained,
        "decoder": type(decoder).__name__ if request.sync_decoder == "vae" else request.sync_decoder,
    }
    return guidance, details, [model.pipeline.unet, decoder]


def sync_anchors(request: GenerateRequest, views: CanvasViews) -> list[int]:
    """SyncDiffusion's anchor of every view of ``views``, one index per view: for ``--sync-anchor center``
    ``ring_anchor_indices`` (the view nearest the centre; on equirect, each ring's view facing longitude 0),
    else the given index for all. Raises BadRequest for an index past the views."""
    if request.sync_anchor == "center":
        return ring_anchor_indices(views)
    if request.sync_anchor >= len(views):
        raise BadRequest(
            f"--sync-anchor {request.sync_anchor} is not a view: this canvas has {len(views)} views (0 to {len(views) - 1})."
        )
    return [request.sync_anchor] * len(views)


@contextlib.contextmanager
def gradient_checkpointing(modules: list):
    """Turn on diffusers' gradient checkpointing in ``modules`` for the block, and off again after: the
    models are cached between jobs. It acts only where autograd is on (SyncDiffusion's gradient pass)."""
    for module in modules:
        module.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for module in modules:
            module.disable_gradient_checkpointing()


def initial_noise(seed: int, shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unit Gaussian canvas noise drawn as diffusers draws it: a CPU generator seeded with ``seed``,
    sampled in ``dtype`` on the CPU and moved to ``device``, so a seed gives the same noise on any device."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=device, dtype=dtype)


def package_versions() -> dict:
    """Versions of SyncSphere, Python and the packages that decide the result."""
    import diffusers
    import numpy
    import transformers

    return {
        "syncsphere": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
