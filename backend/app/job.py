"""One generation: check the request, load the model, sample, decode, write. The CLI and the server call it.

``check_request`` runs every check that needs no weights (the CLI calls it before anything loads) and
returns the frozen request every later stage reads (``engine.resolve``); ``run_job`` runs the stages and
reports them through the same callback the denoising loop uses. Callers hold ``products.files.output_lock`` on
the output folder from before ``check_request`` until ``run_job`` ends, so a second run into it is refused
before anything loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
import secrets
import sys
import time

import torch

from .. import __version__
from ..engine.generation import check_scheduler_name, generate_image
from ..engine.memory import check_job_fits, component_bytes, denoiser_weight_bytes, free_memory_bytes, loads_on_device
from ..engine.model_manager import check_safetensors_file
from ..engine.models import (
    LoadedModel,
    ModelCache,
    activation_config,
    QUANTIZE_NEEDS_TORCHAO,
    component_weight_bytes,
    denoising_model,
    hub_offline,
    read_model_geometry,
    read_unet_config,
    read_vae_config,
    resolve_device,
    resolve_dtype,
    resolve_lora_source,
    resolve_model_source,
    weights_file_bytes,
)
from ..engine.resolve import CheckedRequest, ResolvedRequest, resolve_request
from ..engine.sampler import StepReport
from ..errors import BadRequest, JobCancelled, SyncSphereError
from ..products.files import check_output_folder
from ..products.images import read_start_image, srgb_to_linear
from ..products.outputs import PreviewFile, job_output_names, write_job_outputs
from ..request import FEW_STEP_SAMPLING, UPSCALE_STRENGTH, GenerateRequest


def check_request(request: GenerateRequest) -> CheckedRequest:
    """Check ``request`` as far as it can be without loading weights, and decide what it leaves open.

    Returns a frozen ``CheckedRequest``: the validated parameters with the seed decided (a random one when
    none is given) and the output folder checked, the model source, LoRA, device and dtype, and, when the
    model's config files give its geometry, the ``ResolvedRequest`` (window, stride, views, prompts,
    anchors). Reads only config files; ``request`` itself is not changed. Raises BadRequest or
    ModelNotFound with one sentence (BadRequest too when the output folder cannot be written or another
    run holds it: ``files.check_output_folder``).
    """
    params = request.validated()
    if params.seed is None:
        params = dataclasses.replace(params, seed=secrets.randbelow(2**32))
    check_output_folder(params.out, job_output_names(params.layout), params.overwrite)
    if params.init_image is not None:
        read_start_image(params.init_image, params.exposure)  # a damaged file: one sentence before the model loads
    if params.photo is not None:
        read_start_image(params.photo, params.exposure)
    source = resolve_model_source(params.model, params.allow_pickle)
    lora = resolve_lora_source(params.lora, params.allow_pickle) if params.lora else None
    if params.unet_file is not None:
        check_safetensors_file(params.unet_file, "UNet file")  # a damaged file: one sentence before the model loads
    if params.quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise BadRequest(QUANTIZE_NEEDS_TORCHAO)
    unet_config = read_unet_config(source)
    geometry = read_model_geometry(source, unet_config)
    check_scheduler_name(params.scheduler)
    if params.scheduler in FEW_STEP_SAMPLING and params.guidance > 1:
        print(f"warning: --guidance {params.guidance:g} with --scheduler {params.scheduler} adds an unconditional pass per "
              "view, which models distilled to run without guidance (SDXL-Lightning, Turbo) over-saturate with; "
              "use --guidance 0", file=sys.stderr)
    device = resolve_device(params.device)
    dtype = resolve_dtype(params.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise BadRequest("float16 is not supported on the CPU; use --dtype float32 or --dtype auto.")
    resolved = None
    if geometry is not None:
        # Before the views are built: a canvas too large for this machine is refused before it allocates.
        weights = component_weight_bytes(source, dtype, params.quantize)
        check_job_fits(upscaled_request(params) if params.upscale else params, device, dtype, activation_config(unet_config),
                       read_vae_config(source), weights_file_bytes(source),
                       largest_model_bytes=denoiser_weight_bytes(weights))
        resolved = resolve_request(params, source, lora, device, dtype, geometry, unet_config)
        if params.upscale:  # the upscaling pass's views, checked before the model loads
            resolve_request(upscaled_request(params), source, lora, device, dtype, geometry, unet_config)
    return CheckedRequest(params, source, lora, device, dtype, resolved)


def load_job_model(checked: CheckedRequest, models: ModelCache) -> LoadedModel:
    """``checked``'s model from ``models`` (the cached one, or loaded): a new load goes onto a GPU only when its
    weights together fit there (``memory.loads_on_device``, from the safetensors headers' sizes), else into CPU
    memory for the memory plan to move stage by stage."""
    device = checked.device
    weights = component_weight_bytes(checked.source, checked.dtype, checked.params.quantize) if device.type != "cpu" else {}
    on_device = loads_on_device(checked.params.memory, device, sum(weights.values()),
                                free_memory_bytes(device) if device.type != "cpu" else None)
    return models.get(checked, on_device)


def run_job(checked: CheckedRequest, report: StepReport | None = None, models: ModelCache | None = None) -> dict:
    """Run one generation and write its files. Returns the written paths ({"png", "exr", "metadata"}, and for
    equirect jobs the cube map's {"faces": {"F": …}, "dice", "horizon"}, and unless --no-hdr the HDR
    lighting's {"exr_sky", "lighting"}: ``outputs.write_job_outputs``).

    ``report(stage, step, total, preview)`` is called for stages downloading, loading, denoising (every
    step), decoding and writing; returning True stops the job with JobCancelled. ``preview`` is None, or on the
    denoising steps ``--preview-every`` picks the absolute path of the job's preview PNG, just rewritten
    (``JobPreviews``); it is deleted before the job's files are written. Nothing else is written unless
    the job completes, and then its files replace the folder's old set as a unit. Raises BadRequest,
    ModelNotFound, OutOfMemory or JobCancelled, and SyncSphereError when writing fails (a full disk).

    The image comes from ``generation.generate_image``: the ``--memory`` plan, and the retries when the
    device runs out of memory. metadata.json records the plan that succeeded under "memory"
    (``MemoryPlan.to_dict``, its "attempt" name, the "retries" and "view_batch_used"); "params" keep the
    view batch asked for.
    """
    report = report or (lambda *args: None)
    started = time.perf_counter()

    def stage(name: str) -> None:
        if report(name, 0, 1, None):
            raise JobCancelled(f"The job was cancelled while {name}.")

    # 1. Download what a hub model still lacks, then load it (or take it from the cache).
    download_if_needed(checked, report)
    stage("loading")
    model = load_job_model(checked, models or ModelCache())
    # 2. A single-file checkpoint's geometry is known only now; others were resolved before loading.
    if checked.resolved is None:
        pipeline = model.pipeline  # its weights are loaded: the free memory already counts them
        final = upscaled_request(checked.params) if checked.params.upscale else checked.params
        loaded = component_bytes(pipeline)
        check_job_fits(final, model.device, model.dtype, activation_config(denoising_model(pipeline).config),
                       pipeline.vae.config, 0, largest_model_bytes=denoiser_weight_bytes(loaded)
                       if model.device.type != "cpu" else 0)
    resolved = checked.resolved_for(model)
    timings = {"loading_s": time.perf_counter() - started}
    # 3. Denoise (with a preview picture every --preview-every steps) and decode, within the memory plan.
    start_image = read_start_image(resolved.params.init_image, resolved.params.exposure) if resolved.params.init_image else None
    photo = read_start_image(resolved.params.photo, resolved.params.exposure) if resolved.params.photo else None
    with JobPreviews(resolved.params, model, report) as previews:
        image, canvas, details, attempt_timings, memory = generate_image(resolved, model, previews, stage, start_image, photo)
        if resolved.params.upscale:  # 5. --upscale: img2img of the image at the larger size
            upscaled = resolve_request(upscaled_request(resolved.asked), checked.source, checked.lora, checked.device,
                                       checked.dtype, resolved.geometry, resolved.unet_config)
            image, canvas, upscale_details, upscale_timings, memory = generate_image(upscaled, model, previews, stage, image,
                                                                                      photo)
            details["upscale"] = {"width": upscaled.params.width, "height": upscaled.params.height,
                                  "strength": upscaled.params.strength, **upscale_details,
                                  **{f"upscale_{name}": seconds for name, seconds in upscale_timings.items()}}
    timings.update(attempt_timings)
    # 4. HDR lighting, metadata, and every file written at once.
    stage("writing")
    hdr = make_lighting(resolved.params, image, timings)
    timings["total_s"] = time.perf_counter() - started
    metadata = job_metadata(resolved, model, canvas, details, memory, timings, hdr, previews.details())
    params = resolved.params
    return write_job_outputs(params.out, image, metadata, cube_map=params.cube_map, hdr=hdr, half=params.half)


class JobPreviews:
    """The job's step report for the engine: the loop's preview latents become the job's preview PNG.

    Called as the denoising loop's ``report(stage, step, total, latent)``: when ``latent`` (the canvas's
    predicted clean latent, on the steps ``--preview-every`` picks) is given, it is turned into an image
    (``engine.preview.canvas_preview``: TAESD when cached, else the linear projection) and written to the
    output folder (``outputs.PreviewFile``); then the job's own ``report`` gets the PNG's path in its place
    (None on the other steps and stages) and its answer is returned. A preview that cannot be made or written
    is a warning on stderr and no more previews, never a failed job. As a context manager it deletes the
    preview on exit. ``details()``: what metadata.json records under "preview" ({"every", "decoder",
    "count", "seconds"}, the seconds spent on previews, which "denoising_s" includes), None without previews.
    """

    def __init__(self, params: GenerateRequest, model: LoadedModel, report: StepReport):
        from ..engine.preview import canvas_preview

        self.report = report
        self.every = params.preview_every
        self.file = PreviewFile(params.out) if self.every else None
        pipeline = model.pipeline
        self.project = canvas_preview(pipeline.vae.config, model.geometry.vae_scale_factor, model.device,
                                      model.dtype) if self.file else None
        self.decoder = self.project.name if self.project is not None else None
        self.count, self.seconds = 0, 0.0

    def __call__(self, stage: str, step: int, total: int, latent) -> bool | None:
        path = None
        if latent is not None and self.project is not None:
            began = time.perf_counter()
            try:
                path = self.file.write(self.project(latent))
            except (SyncSphereError, OSError, RuntimeError, ValueError) as error:
                print(f"warning: no more previews: the preview could not be made ({error})", file=sys.stderr)
                self.project = None
            else:
                self.count += 1
                self.seconds += time.perf_counter() - began
        return self.report(stage, step, total, path)

    def details(self) -> dict | None:
        """metadata.json's "preview" (see the class), or None when no preview was made."""
        if not self.count:
            return None
        return {"every": self.every, "decoder": self.decoder, "count": self.count, "seconds": self.seconds}

    def __enter__(self) -> "JobPreviews":
        return self

    def __exit__(self, *exc) -> bool:
        if self.file is not None:
            self.file.remove()
        return False


def upscaled_request(params: GenerateRequest) -> GenerateRequest:
    """The upscaling pass of a validated request with ``--upscale S``: its canvas S times as wide and high, the
    first pass's image as the start at ``UPSCALE_STRENGTH`` with the same steps (``int(steps * strength)`` of
    them run) and the seed + 3 (the first pass's noise is not reused). ``params`` as asked (``ResolvedRequest.asked``),
    so the window and stride are chosen for the larger canvas as for any."""
    return dataclasses.replace(params, width=params.width * params.upscale, height=params.height * params.upscale,
                               upscale=None, init_image=None, strength=UPSCALE_STRENGTH, seed=(params.seed + 3) % 2**63)


def make_lighting(params: GenerateRequest, image, timings: dict):
    """The HDR lighting of the job's image ((H, W, 3) sRGB floats in [0, 1]; ``hdr.make_hdr``) when the job
    makes it (``params.hdr``), else None; records its seconds in ``timings["hdr_s"]``."""
    if not params.hdr:
        return None
    from ..products.hdr import make_hdr

    hdr = make_hdr(srgb_to_linear(image), params.exposure, params.sun_ratio, params.sun_strength,
                   params.sun_direction, params.half)
    timings["hdr_s"] = hdr.details["seconds"]
    return hdr


def job_metadata(resolved: ResolvedRequest, model: LoadedModel, canvas, details: dict, memory: dict,
                 timings: dict, hdr, preview: dict | None = None) -> dict:
    """What metadata.json records of a job: its parameters as resolved, the seed, the model, device and dtype,
    the canvas, the sampling ``details``, the ``memory`` plan, ``timings``, package versions, the HDR
    lighting's details and the ``preview``s made (``JobPreviews.details``)."""
    params = resolved.params
    metadata = {
        "params": params.to_dict(),
        "seed": params.seed,
        "model": {"id": params.model, "kind": model.source.kind, **vars(model.geometry)},
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "canvas": {"kind": canvas.kind, "latent_height": canvas.height, "latent_width": canvas.width},
        "sync": params.sync,
        **details,
        "memory": memory,
        "timings": timings,
        "versions": package_versions(),
    }
    if hdr is not None:
        metadata["hdr"] = hdr.details
    if preview is not None:
        metadata["preview"] = preview
    return metadata


def download_if_needed(checked: CheckedRequest, report: StepReport) -> None:
    """Before loading a hub model that is not completely in the cache, download what the engine loads
    (``model_manager.download_model``), reporting stage "downloading" with bytes done and total as step and
    total; returning True from ``report`` cancels (JobCancelled). Offline, a model missing from the cache is
    left to the loader, whose error names the model and how to point at a local folder."""
    from ..engine.model_manager import download_model, is_cached

    if checked.source.kind != "hub" or hub_offline() or is_cached(checked.source.location):
        return
    download_model(checked.source.location, progress=lambda done, total, name: report("downloading", done, total, None))


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
