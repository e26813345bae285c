"""One resolved request: every decision a job makes before its first denoising step, made once.

``resolve_request`` turns a validated request (``GenerateRequest.validated``) and the model's geometry into a
frozen ``ResolvedRequest``: the window and stride, the view set and its views (built once), the fusion, each
view's prompt and SyncDiffusion's anchors. Every later stage (memory plan, denoising, decoding, metadata)
reads it and none writes it. The job runner (``app/job.py``) resolves before any weights load when the
model's configs give its geometry, and right after loading for single-file checkpoints, whose geometry only
diffusers' loader knows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import BadRequest
from ..request import DEFAULT_VIEW_SET, UP_DOWN_PITCH, GenerateRequest, ModelGeometry
from ..sphere.canvas import Canvas
from ..sphere.schedules import ViewSchedule, shifted_offsets
from ..sphere.view_sets import CanvasViews, band_rows, canvas_views
from .models import LoadedModel, ModelSource, denoising_model
from .sync.mad import block_divisors, check_mad, patch_size
from .sync.syncdiffusion import ring_anchor_indices


@dataclass(frozen=True)
class CheckedRequest:
    """A request checked before any weights load (``app.job.check_request``).

    params: validated (``GenerateRequest.validated``) with the seed decided and the output folder checked.
    source, lora, device, dtype: the model, its LoRA (or None), where and in which precision it runs.
    resolved: the ``ResolvedRequest`` when the model's config files give its geometry (hub ids and folders),
        None for single-file checkpoints until they load (``resolved_for``).
    """

    params: GenerateRequest
    source: ModelSource
    lora: ModelSource | None
    device: torch.device
    dtype: torch.dtype
    resolved: "ResolvedRequest | None" = None

    def resolved_for(self, model: LoadedModel) -> "ResolvedRequest":
        """The resolved request for the loaded ``model``: ``resolved`` when the configs gave it, else resolved
        now against the model's geometry and UNet. Raises BadRequest with one sentence."""
        if self.resolved is not None:
            return self.resolved
        return resolve_request(self.params, self.source, self.lora, self.device, self.dtype, model.geometry,
                               denoising_model(model.pipeline))


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with everything decided that the job needs before denoising.

    params: the parameters as metadata.json records them: validated, the seed, window, stride and the view
        set's name (equirect) filled in.
    source, lora, device, dtype: the model, its LoRA (or None), where and in which precision it runs.
    geometry: the model's VAE factor, latent channels and window.
    views: the canvas and its views (``CanvasViews``), built once.
    prompts, prompt_rows: the distinct prompts and each view's row among them (``view_prompt_rows``).
    anchors: SyncDiffusion's anchor view of every view (``sync_anchors``), None without SyncDiffusion.
    unet_config: the UNet's config the views were checked against (MAD's feature resolutions).
    asked: the validated parameters before the model's choices, from which ``for_memory_plan`` resolves again.
    schedule: the shifted schedule's views of every step (``sphere.schedules.ViewSchedule``), None for dense.
        With it, ``views``, ``prompt_rows`` and ``anchors`` are those of the first step, ``prompts`` those of
        every step, and ``step_prompt_rows`` / ``step_anchors`` give each step's.
    """

    params: GenerateRequest
    source: ModelSource
    lora: ModelSource | None
    device: torch.device
    dtype: torch.dtype
    geometry: ModelGeometry
    views: CanvasViews
    prompts: tuple[str, ...]
    prompt_rows: tuple[int, ...]
    anchors: tuple[int, ...] | None
    unet_config: object
    asked: GenerateRequest
    schedule: ViewSchedule | None = None
    step_prompt_rows: tuple[tuple[int, ...], ...] | None = None
    step_anchors: tuple[tuple[int, ...], ...] | None = None

    def views_per_step(self) -> list[int]:
        """How many views each denoising step runs (the same every step for the dense schedule)."""
        return self.schedule.views_per_step() if self.schedule is not None else [len(self.views)] * self.params.steps

    @property
    def fusion(self) -> str:
        """What the loop fuses: "noisy", "clean" or "own" (``params.resolved_fusion``)."""
        return self.params.resolved_fusion


def resolve_request(asked: GenerateRequest, source: ModelSource, lora: ModelSource | None, device: torch.device,
                    dtype: torch.dtype, geometry: ModelGeometry, unet_config) -> ResolvedRequest:
    """The ``ResolvedRequest`` of the validated request ``asked`` (its seed decided) for a model of ``geometry``
    whose UNet has ``unet_config`` (a dict or diffusers config; the UNet itself works too). Raises BadRequest
    with one sentence (sizes against the model, a view set that does not fit, MAD that cannot merge, a
    per-direction prompt with no view to act on, an anchor that is not a view, a method a transformer model does not
    run: ``check_transformer_request``, MAD with per-view prompts on one: ``check_merged_joint_attention``)."""
    schedule_name = asked.resolved_schedule
    params = dataclasses.replace(asked.sized_for_model(geometry), schedule=schedule_name)
    check_transformer_request(params, unet_config)
    view_set, views, row_multiple = choose_views(params, geometry.vae_scale_factor, unet_config)
    if schedule_name == "shifted":  # windows that do not overlap: the dense views are built only for their rows
        dense_views = views
        params = dataclasses.replace(params, stride=params.window)
        view_set, views, row_multiple = choose_views(params, geometry.vae_scale_factor, unet_config)
    params = dataclasses.replace(params, views=view_set)
    if schedule_name == "dense":
        prompts, rows = view_prompt_rows(params, views)
        check_merged_joint_attention(params, prompts, unet_config)
        anchors = tuple(sync_anchors(params, views)) if params.sync == "syncdiffusion" else None
        return ResolvedRequest(params, source, lora, device, dtype, geometry, views, tuple(prompts), tuple(rows), anchors,
                               unet_config, asked)
    schedule = ViewSchedule(views, shifted_offsets(params.seed, params.steps, params.window, row_multiple), dense_views)
    steps = [schedule.views_at(step) for step in range(params.steps)]
    prompts, step_rows = schedule_prompt_rows(params, steps)
    check_merged_joint_attention(params, prompts, unet_config)
    step_anchors = tuple(tuple(sync_anchors(params, step)) for step in steps) if params.sync == "syncdiffusion" else None
    return ResolvedRequest(params, source, lora, device, dtype, geometry, steps[0], prompts, step_rows[0],
                           step_anchors[0] if step_anchors else None, unet_config, asked, schedule, step_rows, step_anchors)


def check_transformer_request(request: GenerateRequest, config) -> None:
    """Refuse, with one sentence, what a model whose denoiser is a diffusion transformer (``config``: its config,
    dict or diffusers config, or the model, with a ``patch_size``; SD3) cannot run; nothing for a UNet or None.
    ``request``: validated and sized for the model. Refused: SyncDiffusion's
    ``--sync-decoder taesd`` (no tiny autoencoder of 16-channel latents is known here; ``vae`` or a folder work),
    another ``--scheduler`` than auto (the model's flow-matching sampler), ``--lora`` (not built for transformers
    yet), and a window that is not a whole number of patches or more patches than the model's position grid."""
    if isinstance(config, torch.nn.Module):  # the loaded model itself (``CheckedRequest.resolved_for``)
        config = config.config
    patch = config.get("patch_size") if config is not None else None
    if not patch:
        return
    what = "This SD3 model's denoiser is a transformer"
    if request.sync == "syncdiffusion" and request.sync_decoder == "taesd":
        raise BadRequest(f"{what} with 16-channel latents, which TAESD does not decode; use --sync-decoder vae "
                         "(or a folder with a tiny autoencoder of SD3's latents).")
    if request.scheduler != "auto":
        raise BadRequest(f"{what} that samples by flow matching with its own sampler; leave --scheduler auto "
                         f"(not {request.scheduler}).")
    if request.lora:
        raise BadRequest(f"{what}, and LoRAs are only fused into UNet models here; run it without --lora.")
    grid = config.get("pos_embed_max_size") or config["sample_size"] // patch
    if request.window % patch or request.window // patch > grid:
        raise BadRequest(f"--window {request.window} does not suit this SD3 model, whose views must be a whole "
                         f"number of its {patch}-latent patches and at most {grid * patch} latents wide"
                         f"; try --window {min(grid * patch, request.window // patch * patch) or patch}.")


def check_merged_joint_attention(request: GenerateRequest, prompts, config) -> None:
    """Refuse, with one sentence, MAD (``--mad-steps``) on a diffusion transformer (``config`` with a ``patch_size``)
    whose views have different prompts (``prompts``: the job's distinct prompts, ``view_prompt_rows``): its joint
    attention puts image and text tokens in one softmax, so the views' image tokens cannot be merged while each
    keeps its own text (``sync.mad``). Nothing for a UNet, without MAD or with one prompt."""
    if request.mad_steps and len(prompts) > 1 and patch_size(config):
        flags = "--prompt-up/--prompt-down" if request.prompt_up or request.prompt_down else "--sun-direction"
        raise BadRequest(f"MAD (--mad-steps) on this SD3 model merges image and text tokens in one joint attention, "
                         f"so its views cannot keep the different prompts that {flags} gives them; leave one of the "
                         "two out.")


def schedule_prompt_rows(params: GenerateRequest, step_views: list[CanvasViews]) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """(the distinct prompts of every step, row 0 the prompt itself; each step's prompt row of each of its
    views): ``view_prompt_rows`` of every step's views, their prompts gathered in one list so that the denoiser
    encodes them once. Raises BadRequest as ``view_prompt_rows`` does, for any step."""
    prompts, step_rows = [params.prompt], []
    for views in step_views:
        step_prompts, rows = view_prompt_rows(params, views)
        prompts += [text for text in step_prompts if text not in prompts]
        step_rows.append(tuple(prompts.index(step_prompts[row]) for row in rows))
    return tuple(prompts), tuple(step_rows)


def for_memory_plan(resolved: ResolvedRequest, view_batch: int, merged_attention: bool) -> ResolvedRequest:
    """``resolved`` as an attempt with a memory plan runs it: ``view_batch`` views per UNet call, and without
    ``merged_attention`` MAD off. Turning MAD off resolves the request again from what was asked (MAD had
    aligned band+poles' rows to its feature maps, which without it need not be) with the view set chosen for
    it; otherwise the views are the same objects."""
    mad_steps = resolved.params.mad_steps if merged_attention else 0
    if mad_steps != resolved.params.mad_steps:
        asked = dataclasses.replace(resolved.asked, mad_steps=mad_steps, views=resolved.params.views)
        resolved = resolve_request(asked, resolved.source, resolved.lora, resolved.device, resolved.dtype,
                                   resolved.geometry, resolved.unet_config)
    return dataclasses.replace(resolved, params=dataclasses.replace(resolved.params, view_batch=view_batch))


def choose_views(request: GenerateRequest, vae_scale_factor: int, unet_config=None) -> tuple[str | None, CanvasViews, int]:
    """(the view set's name, the canvas and views, the multiple MAD needs window positions to be) of ``request``
    (validated, sized for the model): ``view_sets.canvas_views``; the name is None off equirect canvases, which
    have crop windows only; the multiple is 1 without MAD.

    Without ``--views`` an equirect job uses ``band+poles`` when its canvas is tall enough for a row of
    windows between ±60°, else ``band`` (docs/engine.md, "View sets"); the returned name says which. With
    ``--mad-steps``, ``unet_config`` (the UNet's config, or the UNet) decides the feature resolutions MAD
    merges at: band+poles' rows are aligned to them and the views are checked to divide
    (``sync.mad.check_mad``). Raises BadRequest with one sentence when the view set does not fit the canvas
    or MAD cannot merge it.
    """
    canvas = Canvas(request.layout, request.height // vae_scale_factor, request.width // vae_scale_factor)
    divisors = block_divisors(unet_config, request.mad_blocks) if request.mad_steps and unet_config is not None else {}
    row_multiple = max(divisors.values(), default=1)
    view_set = request.views
    if request.layout == "equirect" and view_set is None:
        first, stop = band_rows(canvas.height, row_multiple=row_multiple)
        view_set = DEFAULT_VIEW_SET if stop - first >= request.window else "band"
    try:
        views = canvas_views(canvas, view_set, request.window, request.stride, row_multiple)
        if divisors:
            check_mad(unet_config, views, request.mad_blocks)
        return view_set, views, row_multiple
    except ValueError as error:
        raise BadRequest(str(error)) from None


def default_view_set_note(asked: GenerateRequest, chosen: GenerateRequest, vae_scale_factor: int) -> str | None:
    """The sentence that tells the user an equirect job without ``--views`` runs ``band`` instead of the default
    ``band+poles`` (``choose_views``: the canvas is too low for a row of windows within ±60°), naming the
    smallest size that fits; None when the job runs what was asked or the default. ``asked``: the validated
    request as the user gave it; ``chosen``: the resolved parameters (their ``views`` and ``window``)."""
    if asked.layout != "equirect" or asked.views is not None or chosen.views != "band":
        return None
    # The lowest taller canvas whose ±60° band holds one window (taller: with MAD's row alignment, which
    # choose_views also applied, the band can fall short on a canvas where it alone would fit).
    latent_height = chosen.height // vae_scale_factor + 1
    while _band_height(latent_height) < chosen.window:
        latent_height += 1
    need = latent_height * vae_scale_factor
    return (f"This {chosen.width}x{chosen.height} world runs --views band, not the default {DEFAULT_VIEW_SET}, whose "
            f"windows within ±60° need a canvas of at least {2 * need}x{need} for a "
            f"{chosen.window * vae_scale_factor} px window; without views looking up and down the zenith and nadir "
            "may pinch into a star (a larger size, or --views ring or cube, avoids that).")


def _band_height(latent_height: int) -> int:
    """Rows of a canvas ``latent_height`` latents high that lie within ±60° (``band_rows``)."""
    first, stop = band_rows(latent_height)
    return stop - first


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
