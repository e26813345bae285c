"""One image from a resolved request: encode the prompts, draw the noise, build the synchronisation, run the
denoising loop (``sampler.sample_canvas``), decode; and the retries when the device runs out of memory.

The job runner (``app/job.py``) calls ``generate_image``; the benchmarks call ``denoise`` to time the
product's own denoising stage. Everything here reads a ``resolve.ResolvedRequest`` and writes nothing into it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import sys
import time
from typing import Callable

import numpy as np
import torch

from ..errors import BadRequest, OutOfMemory, shorten
from ..request import POLE_FACE_VIEW_SETS, SCHEDULER_SETTINGS, SCHEDULERS
from .decode import decode_canvas, decode_pole_caps, vae_latents
from .denoiser import GuidedSD3TransformerDenoiser, GuidedSDXLUNetDenoiser, GuidedUNetDenoiser, sdxl_time_ids
from .memory import (MemoryPlan, StagePlacement, component_bytes, is_out_of_memory, memory_attempts,
                     out_of_memory_message, plan_memory, release_memory, weights_to_place)
from .models import LoadedModel, activation_config, compiled_unet, denoising_model, load_tiny_autoencoder
from .perceptual import load_perceptual_loss
from .preview import TINY_AUTOENCODER_OF_FAMILY, latent_family
from .resolve import ResolvedRequest, for_memory_plan
from .image_start import image_start
from .photo_region import PhotoRegion, composite_photo, known_region, photo_details, photo_region
from .sampler import StepReport, Synchronisation, first_step, sample_canvas
from .sync.mad import MergedAttention
from .sync.syncdiffusion import SyncDiffusionGuidance
from .sync.syncsde import SyncSDE
from .sync.tweedie import is_flow_matching


def generate_image(resolved: ResolvedRequest, model: LoadedModel, report: StepReport,
                   stage: Callable[[str], None], start_image: np.ndarray | None = None,
                   photo: np.ndarray | None = None) -> tuple:
    """The job's image with the memory plan ``--memory`` asks for (``memory.plan_memory``), retried when the
    device runs out of memory anyway: from the same seed with half the view batch, then in low mode with MAD
    off (``memory.memory_attempts``), releasing the failed attempt's memory in between; the denoising steps
    are reported again from step 1. Returns (image as an (H, W, 3) float array in [0, 1], canvas, details,
    {"denoising_s", "decoding_s"}, what metadata.json records under "memory"). ``start_image``: img2img from
    this (H, W, 3) float sRGB image in [0, 1] of any size at ``params.strength`` (``image_start``), None: from
    noise. ``photo``: with ``--photo``, the photo ((h, w, 3) float sRGB in [0, 1]) the image extends, placed by
    ``params.photo_fov``, ``photo_yaw`` and ``photo_pitch`` (``denoise_and_decode``). Raises OutOfMemory when the
    last attempt fails too, JobCancelled when ``report`` or ``stage`` says so."""
    pipeline = model.pipeline
    plan = plan_memory(resolved.params, model.device, model.dtype, activation_config(denoising_model(pipeline).config),
                       pipeline.vae.config, max(resolved.views_per_step()),
                       weights_bytes=weights_to_place(pipeline, model.device),
                       vae_dtype=pipeline.vae.dtype, component_bytes=component_bytes(pipeline))
    attempts = memory_attempts(resolved.params, plan, model.device)
    retries = []
    for number, (attempt_name, attempt_plan) in enumerate(attempts):
        attempt = for_memory_plan(resolved, attempt_plan.view_batch, merged_attention=attempt_plan.mode != "low")
        try:
            image, canvas, details, timings = denoise_and_decode(attempt, model, attempt_plan, report, stage, start_image,
                                                                 photo)
            break
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError; others are re-raised
            if not is_out_of_memory(error, model.device):
                raise
            if number + 1 == len(attempts):
                raise OutOfMemory(out_of_memory_message(attempt.params, model.device, model.dtype)) from error
            retries.append({"view_batch": attempt.params.view_batch, "mad_steps": attempt.params.mad_steps,
                            "reason": "out of memory", "next": attempts[number + 1][0]})
            print(f"warning: the {model.device} device ran out of memory with --view-batch "
                  f"{attempt.params.view_batch}; retrying ({attempts[number + 1][0]})", file=sys.stderr)
        # Outside the except block, so the failed attempt's traceback (and the tensors its frames held) is
        # already dropped when the memory is released.
        release_memory(model.device)
    memory = {**attempt_plan.to_dict(), "attempt": attempt_name, "retries": retries,
              "view_batch_used": attempt.params.view_batch}
    if attempt.params.mad_steps != resolved.params.mad_steps:
        memory["mad_off"] = True  # low mode runs one view at a time; MAD would batch them all
        print("warning: merged attention (--mad-steps) was off: low-memory mode runs one view at a time", file=sys.stderr)
    return image, canvas, details, timings, memory


def denoise_and_decode(resolved: ResolvedRequest, model: LoadedModel, plan: MemoryPlan, report: StepReport,
                       stage: Callable[[str], None], start_image: np.ndarray | None = None,
                       photo: np.ndarray | None = None):
    """One attempt at a job's image with the memory ``plan``: ``denoise`` from the seed's noise, then decode.
    Returns (image as an (H, W, 3) float array, canvas, details, {"denoising_s", "decoding_s"});
    ``stage(name)`` reports the decoding stage (and raises JobCancelled). ``start_image``: as ``generate_image``.
    ``photo``: as ``generate_image``: placed on the canvas (``photo_region``), kept by the loop, and composited
    over the decoded image (``composite_photo``). Keeps nothing between calls, so a retry starts from scratch."""
    params, pipeline = resolved.params, model.pipeline
    placement = StagePlacement(pipeline, model.device, plan.offload,
                               vae_while_denoising=params.sync == "syncdiffusion" and params.sync_decoder == "vae",
                               text_on_cpu=plan.text_on_cpu)
    region = None
    if photo is not None:
        factor = resolved.geometry.vae_scale_factor
        region = photo_region(photo, params.photo_fov, params.photo_yaw, params.photo_pitch,
                              resolved.views.canvas.width * factor, resolved.views.canvas.height * factor)
    latents, canvas, details = denoise(resolved, model, report, placement, start_image, region)
    timings = {"denoising_s": details.pop("seconds")}
    stage("decoding")
    began = time.perf_counter()
    placement.enter("decode")
    image = decode_canvas(pipeline.vae, latents, canvas, in_strips=plan.strip_decode)
    if params.views in POLE_FACE_VIEW_SETS:
        image = decode_pole_caps(pipeline.vae, latents, image, in_strips=plan.strip_decode)
    image = image[0].permute(1, 2, 0).numpy()
    if region is not None:
        image = composite_photo(image, region)
    timings["decoding_s"] = time.perf_counter() - began
    return image, canvas, details, timings


def denoise(resolved: ResolvedRequest, model: LoadedModel, report: StepReport, placement: StagePlacement | None = None,
            start_image: np.ndarray | None = None, photo: PhotoRegion | None = None):
    """Sample the canvas latent of ``resolved`` with its views, fusion and synchronisation; returns (latents,
    canvas, details): details has "views" (how many), "view_set", "fusion", "scheduler", "seconds", with
    per-direction prompts "view_prompts", "syncdiffusion", "syncsde" or "mad" for those methods, and with
    ``--compile`` "compile": {"mode", "reused": whether the compiled UNet was made before this run, by an
    earlier job with the cached model (or an earlier attempt of this job)}.
    ``placement`` moves the models for the text and denoising stages (None: they stay where they are).
    ``start_image``: img2img (``image_start``; details then has "start": {"strength", "steps_run"}), None: from
    the seed's noise. ``photo``: the region the loop keeps (``known_region``; details then has "photo": the
    photo's fov, yaw, pitch and ``photo_details``), None: none."""
    params, views = resolved.params, resolved.views
    placement = placement or StagePlacement(model.pipeline, model.device, offload=False)
    scheduler = make_scheduler(params.scheduler, model.pipeline.scheduler.config, transformer_view_tokens(resolved, model))
    check_steps(scheduler, params.steps)
    began = time.perf_counter()
    start = None
    if start_image is not None:  # encoded first: the VAE's stage, before the text encoders take the device
        placement.enter("decode")
        start = image_start(start_image, views.canvas, resolved.geometry.vae_scale_factor, model.pipeline.vae,
                            params.strength, model.device, model.dtype)
    known = None
    if photo is not None:  # encoded with the VAE too, before the text encoders
        placement.enter("decode")
        known = known_region(photo, views.canvas, resolved.geometry.vae_scale_factor, model.pipeline.vae,
                             model.device, model.dtype)
    placement.enter("text")
    compiled_before = model.compiled_unet is not None
    denoiser = prompt_denoiser(resolved, model, placement.text_device)
    noise, projected_noise = starting_noise(resolved, model)
    sync, predict, sync_details, checkpointed = synchronisation(resolved, model, denoiser)
    placement.enter("denoise")
    # The with-blocks put the cached UNet back as it was, even when the job fails or is cancelled.
    with sync.merged_attention or contextlib.nullcontext(), gradient_checkpointing(checkpointed):
        latents = sample_canvas(predict, scheduler, resolved.schedule or views, noise, steps=params.steps,
                                view_batch=params.view_batch, sync=sync, projected_noise=projected_noise,
                                step_kwargs=stepping_arguments(scheduler, params.seed), report=report,
                                preview_every=params.preview_every, start=start, known=known)
    per_step = resolved.views_per_step()
    details = {"views": len(views), "view_set": params.views, "schedule": params.schedule, "fusion": resolved.fusion,
               "views_per_step": {"mean": sum(per_step) / len(per_step), "min": min(per_step), "max": max(per_step)},
               "unet_rows": denoiser.unet_rows, "scheduler": type(scheduler).__name__,
               "seconds": time.perf_counter() - began}
    if len(resolved.prompts) > 1:  # the first step's views (the shifted schedule's move)
        details["view_prompts"] = {label: resolved.prompts[row]
                                   for label, row in zip(views.labels, resolved.prompt_rows) if row}
    if sync.guidance is not None:
        details["syncdiffusion"] = {**sync_details, "guided_steps": sync.guidance.guided_steps}
    if sync.synchroniser is not None:
        details["syncsde"] = sync.synchroniser.details()
    if sync.merged_attention is not None:
        details["mad"] = {"steps": params.mad_steps, "blocks": list(sync.merged_attention.blocks)}
    if start is not None:
        details["start"] = {"strength": params.strength, "steps_run": params.steps - first_step(params.steps, params.strength)}
    if known is not None:
        details["photo"] = {"fov": params.photo_fov, "yaw": params.photo_yaw, "pitch": params.photo_pitch,
                            **photo_details(photo, known)}
    if params.compile:
        details["compile"] = {"mode": "default", "reused": compiled_before}
    return latents, views.canvas, details


def prompt_denoiser(resolved: ResolvedRequest, model: LoadedModel,
                    text_device: torch.device | None = None) -> GuidedUNetDenoiser:
    """The UNet (compiled with ``--compile``: ``models.compiled_unet``) with classifier-free guidance and each
    view's prompt (``resolved.prompts``/``prompt_rows``) encoded once, by the pipeline's own ``encode_prompt``,
    on ``text_device`` (default the model's device; the CPU where a plan keeps the text encoders there:
    ``MemoryPlan.text_on_cpu``), the embeddings then on the model's device.
    An SDXL model's denoiser (``GuidedSDXLUNetDenoiser``) also takes each prompt's pooled embedding and the time
    ids of a whole image of the window's size (``sdxl_time_ids``); an SD3 model's (``GuidedSD3TransformerDenoiser``)
    is its transformer with each prompt's joint text tokens and pooled projections. Raises BadRequest for an SDXL
    UNet that does not take SDXL's six time ids."""
    params = resolved.params
    uses_guidance = params.guidance > 1.0
    prompts = list(resolved.prompts)
    negative = [params.negative_prompt] * len(prompts) if params.negative_prompt else None
    pipeline = model.pipeline
    unet = compiled_unet(model) if params.compile else denoising_model(pipeline)
    view_prompts = list(resolved.prompt_rows) if len(prompts) > 1 else None
    text_device = text_device or model.device

    def on_model_device(*embeddings):
        return [None if tensor is None else tensor.to(model.device) for tensor in embeddings]

    if model.architecture == "SD3":
        # No negative prompt: the empty prompt's embeddings, as StableDiffusion3Pipeline (no zeros rule).
        prompt_embeds, negative_embeds, pooled, negative_pooled = on_model_device(*pipeline.encode_prompt(
            prompts, None, None, device=text_device, do_classifier_free_guidance=uses_guidance,
            negative_prompt=negative))
        if negative_embeds is not None:
            negative_embeds, negative_pooled = negative_embeds[:1], negative_pooled[:1]
        return GuidedSD3TransformerDenoiser(unet, prompt_embeds, negative_embeds, pooled, negative_pooled,
                                            params.guidance, view_prompts)
    if model.architecture != "SDXL":
        prompt_embeds, negative_embeds = on_model_device(*pipeline.encode_prompt(prompts, text_device, 1, uses_guidance,
                                                                                 negative))
        negative_embeds = negative_embeds[:1] if negative_embeds is not None else None
        return GuidedUNetDenoiser(unet, prompt_embeds, negative_embeds, params.guidance, view_prompts)
    # No negative prompt: zero embeddings when the model's config says force_zeros_for_empty_prompt, as diffusers.
    prompt_embeds, negative_embeds, pooled, negative_pooled = on_model_device(*pipeline.encode_prompt(
        prompts, device=text_device, do_classifier_free_guidance=uses_guidance, negative_prompt=negative))
    try:
        time_ids = sdxl_time_ids(pipeline.unet, params.window * resolved.geometry.vae_scale_factor,
                                 pooled.shape[-1], prompt_embeds.dtype, model.device)
    except ValueError as error:
        raise BadRequest(str(error)) from None
    if negative_embeds is not None:  # one row per prompt, all alike: the denoiser shares one
        negative_embeds, negative_pooled = negative_embeds[:1], negative_pooled[:1]
    return GuidedSDXLUNetDenoiser(unet, prompt_embeds, negative_embeds, pooled, negative_pooled, time_ids,
                                  params.guidance, view_prompts)


def starting_noise(resolved: ResolvedRequest, model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the canvas's noise (1, C, H, W), the projected views' own noise (P, C, s, s) or None), from the seed.
    Projected views get their own noise when they keep their own states (every fusion but "noisy")."""
    params, views, channels = resolved.params, resolved.views, resolved.geometry.latent_channels
    canvas = views.canvas
    noise = initial_noise(params.seed, (1, channels, canvas.height, canvas.width), model.device, model.dtype)
    if resolved.fusion == "noisy" or not views.projected:
        return noise, None
    # seed + 1 belongs to stochastic samplers (stepping_arguments).
    shape = (len(views.projected), channels, views.size, views.size)
    return noise, initial_noise(params.seed + 2, shape, model.device, model.dtype)


def synchronisation(resolved: ResolvedRequest, model: LoadedModel, denoiser: GuidedUNetDenoiser):
    """The strategies ``resolved`` asks for, as (``Synchronisation``, the prediction the loop calls, what
    metadata.json records of SyncDiffusion, the modules its gradient pass checkpoints under
    --sync-checkpointing)."""
    params, views = resolved.params, resolved.views
    guidance, sync_details, differentiated, synchroniser, merged_attention = None, {}, [], None, None
    if params.sync == "syncdiffusion":
        guidance, sync_details, differentiated = syncdiffusion_guidance(resolved, model, denoiser)
    if params.sync == "syncsde":
        synchroniser = SyncSDE(views, params.syncsde_lambda, closed_loop=not params.syncsde_open_chain,
                               compose=params.syncsde_compose)
    predict = denoiser
    if params.mad_steps:
        merged_attention = MergedAttention(denoising_model(model.pipeline), views, params.mad_steps, params.mad_blocks)
        # The processors must know which views each batch holds; the gradient pass's chunks too.
        predict = merged_attention.wrap(denoiser)
        if guidance is not None:
            guidance.predict = merged_attention.wrap(guidance.predict)
    follow = follow_views(resolved, denoiser, guidance, merged_attention) if resolved.schedule is not None else None
    sync = Synchronisation(resolved.fusion, guidance, synchroniser, merged_attention, follow)
    return sync, predict, sync_details, differentiated if params.sync_checkpointing else []


def follow_views(resolved: ResolvedRequest, denoiser: GuidedUNetDenoiser, guidance: SyncDiffusionGuidance | None,
                 merged_attention: MergedAttention | None) -> Callable:
    """The loop's ``Synchronisation.follow_views`` for the shifted schedule: at each step the denoiser takes the
    step's prompt rows, SyncDiffusion its anchors (one per ring of the step's windows) and MAD its views."""

    def follow(step_index: int, views) -> None:
        if denoiser.view_prompts is not None:
            denoiser.view_prompts = list(resolved.step_prompt_rows[step_index])
        if guidance is not None:
            guidance.anchors = list(resolved.step_anchors[step_index])
        if merged_attention is not None:
            merged_attention.use_views(views)

    return follow


def syncdiffusion_guidance(resolved: ResolvedRequest, model: LoadedModel, denoiser: GuidedUNetDenoiser):
    """SyncDiffusion's guidance for a request with ``--sync syncdiffusion`` (its anchors: ``resolved.anchors``).

    Returns (the guidance, what metadata.json records of it, the modules its gradient pass runs through).
    Raises BadRequest (a bad decoder) or ModelNotFound (decoder, loss trunk).
    """
    params = resolved.params
    if params.sync_decoder == "vae":
        decoder = model.pipeline.vae
    else:
        # taesd: the tiny autoencoder of the model's latents, TAESD for SD 1/2 and TAESDXL for SDXL.
        family = latent_family(model.pipeline.vae.config) or "sd"
        spec = TINY_AUTOENCODER_OF_FAMILY[family] if params.sync_decoder == "taesd" else params.sync_decoder
        decoder = load_tiny_autoencoder(
            spec, model.device, model.dtype, model.geometry.latent_channels, params.allow_pickle
        )

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return decoder.decode(vae_latents(latents, decoder)).sample

    # The loss network runs in float32: LPIPS divides by feature norms that underflow in float16.
    loss = load_perceptual_loss(
        params.sync_loss, model.device, params.sync_loss_backbone, params.sync_loss_size,
        scale=1e6 if params.sync_loss == "style" else 1.0,  # the supplementary's S.4 scaling of the style loss
    )
    if not loss.backbone.pretrained and params.sync_loss_backbone == "auto":
        print(f"warning: SyncDiffusion's loss uses a {loss.backbone.describe()} trunk; the guidance follows "
              "random features instead of perceptual ones", file=sys.stderr)
    anchors = list(resolved.anchors)
    guidance = SyncDiffusionGuidance(
        predict=denoiser.predict, decode=decode, loss=loss, weight=params.sync_weight, decay=params.sync_decay,
        steps=params.sync_steps, every=params.sync_every, anchors=anchors, chunk=params.view_batch,
        reuse_prediction=params.sync_reuse_eps,
    )
    details = {
        "anchors": sorted(set(anchors)),
        "loss": params.sync_loss,
        "loss_backbone": loss.backbone.describe(),
        "loss_pretrained": loss.backbone.pretrained,
        "decoder": type(decoder).__name__ if params.sync_decoder == "vae" else params.sync_decoder,
    }
    return guidance, details, [denoising_model(model.pipeline), decoder]


def check_scheduler_name(name: str) -> None:
    """Check that ``name`` (a SCHEDULERS key or a diffusers class name) is a sampler this engine can run: a
    scheduler of Stable Diffusion's family (``DDIMScheduler._compatibles``, plus LCM) whose packages are
    installed. Raises BadRequest with one sentence; "auto" always passes."""
    import diffusers

    class_name = SCHEDULERS.get(name) or name
    if name == "auto":
        return
    if not hasattr(diffusers, class_name):
        raise BadRequest(f"diffusers {diffusers.__version__} has no scheduler named {shorten(name)}.")
    usable = set(diffusers.DDIMScheduler._compatibles) | {"LCMScheduler"}
    if class_name not in usable:
        raise BadRequest(f"{class_name} is not a sampler for Stable Diffusion's noise schedule (it belongs to another "
                         f"model family); use one of {', '.join(key for key in SCHEDULERS if key != 'auto')} "
                         "or another diffusers scheduler compatible with DDIMScheduler.")
    module = getattr(diffusers, class_name).__module__.rsplit(".", 1)[-1]
    if module.startswith("dummy_"):  # diffusers' stand-in for a class whose packages are missing
        packages = [package for package in module.removeprefix("dummy_").removesuffix("_objects").split("_and_")
                    if importlib.util.find_spec(package) is None]
        raise BadRequest(f"The scheduler {class_name} needs {' and '.join(packages)}, which this Python does not "
                         f"have (pip install {' '.join(packages)}), or choose another --scheduler.")


def make_scheduler(name: str, config, view_tokens: int | None = None):
    """A diffusers scheduler of the class named by ``name`` (a SCHEDULERS key or class name) from ``config``
    (the model's scheduler config), with the name's ``SCHEDULER_SETTINGS`` over it (``euler-trailing``: Euler with
    ``timestep_spacing`` trailing, SDXL-Lightning's sampler, on a base model that ships another spacing).
    ``auto``: the model's own class when it is a few-step sampler (an ``LCMScheduler``, or ``trailing`` timestep
    spacing as SD-Turbo ships), the ``FlowMatchingSampler`` of a flow-matching model (SD3; ``view_tokens``: its
    transformer's tokens per view, for a resolution-dependent shift), else DDIM."""
    import diffusers

    if name == "auto" and is_flow_matching(dict(config)):
        from .flow_matching import make_flow_matching_sampler

        return make_flow_matching_sampler(config, view_tokens)
    if name == "auto":
        own = config.get("_class_name", "")
        name = own if own == "LCMScheduler" or config.get("timestep_spacing") == "trailing" else "ddim"
    return getattr(diffusers, SCHEDULERS.get(name) or name).from_config(config, **SCHEDULER_SETTINGS.get(name, {}))


def check_steps(scheduler, steps: int) -> None:
    """Check that ``scheduler`` (a diffusers scheduler of the model's config) can sample in ``steps`` steps: its
    own rules (LCM takes at most its ``original_inference_steps``) and every timestep one of the model's
    training noise levels (DDIM's ``steps_offset`` would make 1000 steps reach level 1000 of 0..999). Raises
    BadRequest with one sentence. Sets the timesteps of a copy; ``scheduler`` is not changed."""
    trial = copy.deepcopy(scheduler)
    try:
        trial.set_timesteps(steps)
    except ValueError as error:
        raise BadRequest(f"--steps {steps} does not suit the {type(scheduler).__name__} sampler: "
                         f"{shorten(str(error).strip().split('. ')[0].rstrip('.'), 300)[1:-1]}.") from None
    levels = trial.config.num_train_timesteps
    # A flow-matching sampler's timesteps are σ · levels, continuous: σ = 1 is its first, not past the last.
    if not is_flow_matching(trial) and float(trial.timesteps.max()) >= levels:
        raise BadRequest(f"--steps {steps} is too many for the {type(scheduler).__name__} sampler, whose timesteps "
                         f"would pass the model's {levels} noise levels; use fewer steps (20-50 are typical).")


def transformer_view_tokens(resolved: ResolvedRequest, model: LoadedModel) -> int | None:
    """Tokens of one view in ``model``'s transformer ((window / patch size)²), None for a UNet."""
    patch = denoising_model(model.pipeline).config.get("patch_size")
    return (resolved.params.window // patch) ** 2 if patch else None


def stepping_arguments(scheduler, seed: int) -> dict:
    """Extra arguments of ``scheduler.step``: stochastic samplers (ancestral, SDE) draw their per-step noise
    from a generator seeded with ``seed + 1``; deterministic ones take none."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator("cpu").manual_seed(seed + 1)}
    return {}


def initial_noise(seed: int, shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unit Gaussian canvas noise drawn as diffusers draws it: a CPU generator seeded with ``seed``,
    sampled in ``dtype`` on the CPU and moved to ``device``, so a seed gives the same noise on any device."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=device, dtype=dtype)


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
