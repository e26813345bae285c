"""One generation: check the request, load the model, sample, decode, write. The CLI and the server call it.

``check_request`` runs every check that needs no weights (the CLI calls it before anything loads);
``run_job`` does the work and reports stages through the same callback the denoising loop uses.
"""

from __future__ import annotations

import inspect
import platform
import secrets
import time
from dataclasses import dataclass

import torch

from . import __version__
from .canvas import Canvas
from .decode import decode_canvas
from .denoiser import GuidedUNetDenoiser
from .errors import BadRequest, JobCancelled, OutOfMemory
from .models import LoadedModel, ModelSource, load_model, read_model_geometry, resolve_device, resolve_dtype, resolve_model_source
from .outputs import write_job_outputs
from .request import SCHEDULERS, GenerateRequest
from .sampler import StepReport, sample_canvas


@dataclass
class CheckedRequest:
    """A validated request and what was resolved for it without loading weights."""

    request: GenerateRequest
    source: ModelSource
    device: torch.device
    dtype: torch.dtype


def check_request(request: GenerateRequest) -> CheckedRequest:
    """Validate ``request`` (fills defaults in place) and resolve model source, device and dtype.

    Reads only config files. Raises BadRequest or ModelNotFound with one sentence.
    """
    request.validate()
    source = resolve_model_source(request.model, request.allow_pickle)
    geometry = read_model_geometry(source)
    if geometry is not None:
        request.validate_for_model(geometry)
    import diffusers

    if not hasattr(diffusers, SCHEDULERS.get(request.scheduler, request.scheduler)):
        raise BadRequest(f"diffusers {diffusers.__version__} has no scheduler named {request.scheduler}.")
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise BadRequest("float16 is not supported on the CPU; use --dtype float32 or --dtype auto.")
    return CheckedRequest(request, source, device, dtype)


class ModelCache:
    """Keeps the last loaded model so consecutive jobs with the same model skip loading (the server)."""

    def __init__(self):
        self._key = None
        self._model: LoadedModel | None = None

    def get(self, checked: CheckedRequest) -> LoadedModel:
        """The model for ``checked``: the cached one when source, device, dtype and config match."""
        request = checked.request
        key = (checked.source, checked.device, checked.dtype, request.allow_pickle, request.model_config)
        if key != self._key:
            self._model = None  # release the old model before loading the next one
            self._model = load_model(checked.source, checked.device, checked.dtype, request.allow_pickle, request.model_config)
            self._key = key
        return self._model


def make_scheduler(name: str, config):
    """A diffusers scheduler of the class named by ``name`` (a SCHEDULERS key or class name) from ``config``."""
    import diffusers

    return getattr(diffusers, SCHEDULERS.get(name, name)).from_config(config)


def run_job(checked: CheckedRequest, report: StepReport | None = None, models: ModelCache | None = None) -> dict:
    """Run one generation and write its files. Returns the written paths ({"png", "exr", "metadata"}).

    ``report(stage, step, total, preview)`` is called for stages loading, denoising (every step),
    decoding and writing; returning True stops the job with JobCancelled. Nothing is written unless the
    job completes. Raises BadRequest, ModelNotFound, OutOfMemory or JobCancelled.
    """
    request = checked.request
    report = report or (lambda *args: None)
    timings = {}
    started = time.perf_counter()

    def stage(name: str) -> None:
        if report(name, 0, 1, None):
            raise JobCancelled(f"The job was cancelled while {name}.")

    stage("loading")
    model = (models or ModelCache()).get(checked)
    pipeline, geometry = model.pipeline, model.geometry
    request.validate_for_model(geometry)  # single-file checkpoints only know their geometry now
    if request.seed is None:
        request.seed = secrets.randbelow(2**32)
    timings["loading_s"] = time.perf_counter() - started

    try:
        latents, canvas, details = _denoise(request, model, report)
        timings["denoising_s"] = details.pop("seconds")
        stage("decoding")
        began = time.perf_counter()
        image = decode_canvas(pipeline.vae, latents, canvas)[0].permute(1, 2, 0).numpy()
        timings["decoding_s"] = time.perf_counter() - began
    except torch.OutOfMemoryError as error:
        raise OutOfMemory(
            f"The {model.device} device ran out of memory; lower --view-batch, the canvas size or use --dtype float16."
        ) from error

    stage("writing")
    timings["total_s"] = time.perf_counter() - started
    metadata = {
        "params": request.to_dict(),
        "seed": request.seed,
        "model": {"id": request.model, "kind": model.source.kind, **vars(geometry)},
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "canvas": {"kind": canvas.kind, "latent_height": canvas.height, "latent_width": canvas.width},
        "sync": "multidiffusion",
        **details,
        "timings": timings,
        "versions": package_versions(),
    }
    return write_job_outputs(request.out, image, metadata)


def _denoise(request: GenerateRequest, model: LoadedModel, report: StepReport):
    """Sample the canvas latent; returns (latents, canvas, {"views", "scheduler", "seconds"})."""
    pipeline, geometry = model.pipeline, model.geometry
    factor = geometry.vae_scale_factor
    canvas = Canvas(request.layout, request.height // factor, request.width // factor)
    views = canvas.crop_views(request.window, request.stride)
    scheduler = make_scheduler(request.scheduler, pipeline.scheduler.config)
    began = time.perf_counter()
    uses_guidance = request.guidance > 1.0
    prompt_embeds, negative_embeds = pipeline.encode_prompt(
        request.prompt, model.device, 1, uses_guidance, request.negative_prompt or None
    )
    denoiser = GuidedUNetDenoiser(pipeline.unet, prompt_embeds, negative_embeds, request.guidance)
    noise = initial_noise(request.seed, (1, geometry.latent_channels, canvas.height, canvas.width), model.device, model.dtype)
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        # Stochastic samplers (ancestral, SDE) draw their per-step noise from the seed too.
        step_kwargs["generator"] = torch.Generator("cpu").manual_seed(request.seed + 1)
    latents = sample_canvas(denoiser, scheduler, canvas, views, noise, request.steps, request.view_batch, report, step_kwargs)
    details = {"views": len(views), "scheduler": type(scheduler).__name__, "seconds": time.perf_counter() - began}
    return latents, canvas, details


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
