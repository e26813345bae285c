"""The parameter object of one generation, shared by the CLI and the stdio server.

Field names are the CLI flags in snake_case (``--view-batch`` -> ``view_batch``), which is also what
the protocol's ``params`` object uses. Standard library only, so it validates without torch: every
check here runs before any model is loaded and before any output folder is created (the files a job would
replace are checked by ``app.job.check_request``, which knows their names from ``products.outputs``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from .errors import BadRequest, shorten

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"
LAYOUTS = ("wide", "equirect", "tile")
DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "float16", "bfloat16")
# --memory: "full" keeps everything on the device at once, "low" trades time for memory (model offload to
# the CPU between stages, view batch 1, a strip-wise VAE decode), "auto" picks one from the device's free
# memory and the canvas (backend/engine/memory.py).
MEMORY_MODES = ("auto", "full", "low")
# --quantize: int8 stores the Linear weights of the denoiser and the text encoders as int8 with a scale per output
# row (torchao's weight-only int8; the VAE, convolutions and embeddings stay in the job's dtype), about half their
# float16 memory (backend/engine/models.py's quantize_weights).
QUANTIZE_MODES = ("none", "int8")
MAX_CANVAS_PIXELS = 16384
MAX_STEPS = 1000  # the noise levels Stable Diffusion is trained on; diffusers refuses more steps
MAX_TEXT_CHARACTERS = 10_000  # a prompt far beyond what CLIP reads (77 tokens); bounds a client's mistake

# HDR lighting (backend/products/hdr.py, issue #8): the defaults of its options.
DEFAULT_SUN_RATIO = 6.0  # the sun's irradiance over the rest of the sky's; clear days are about 3-10
MAX_EXPOSURE = 20.0  # |--exposure| in EV: 2^20 is a million; this only stops typos
HALF_EXPOSURE = 15.0  # with --half an 8-bit sky of 1.0 times 2^15 stays below the largest half float, 65504

# --scheduler names and the diffusers classes they stand for; a diffusers class name is accepted too.
# "auto" (the default) is DDIM, MultiDiffusion's sampler, unless the model ships a few-step scheduler
# (backend/engine/generation.py's make_scheduler).
SCHEDULERS = {
    "auto": None,
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-trailing": "EulerDiscreteScheduler",
    "euler-trailing-sample": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}

SCHEDULER_SETTINGS = {
    "euler-trailing": {"timestep_spacing": "trailing"},
    "euler-trailing-sample": {"timestep_spacing": "trailing", "prediction_type": "sample"},
}
"""Config values a --scheduler name sets over the model's scheduler config: ``euler-trailing`` is Euler whose first
timestep is the top noise level, the sampler SDXL-Lightning (and SD/SDXL-Turbo) is distilled for, whatever the
base model's config says (SDXL base ships ``leading``); ``euler-trailing-sample`` the same for a UNet that predicts
the clean sample instead of the noise (SDXL-Lightning's 1-step UNet)."""

FEW_STEP_SAMPLING = {"euler-trailing": (4, 0.0), "euler-trailing-sample": (1, 0.0)}
"""The --steps and --guidance a --scheduler name defaults to on the command line when they are not given:
``euler-trailing`` is SDXL-Lightning's 4 steps without classifier-free guidance (its 2/8-step models take
``--steps`` 2 or 8), ``euler-trailing-sample`` its 1-step model. Every other scheduler: ``DEFAULT_SAMPLING``."""
DEFAULT_SAMPLING = (50, 7.5)


def sampling_defaults(scheduler: str) -> tuple[int, float]:
    """(steps, guidance scale) for a --scheduler name when the user gives neither: ``FEW_STEP_SAMPLING``'s
    entry for a few-step sampler, else ``DEFAULT_SAMPLING``."""
    return FEW_STEP_SAMPLING.get(scheduler, DEFAULT_SAMPLING)

# --sync methods; SyncDiffusion's options (the ``sync_*`` fields) and what they accept.
SYNC_METHODS = ("multidiffusion", "syncdiffusion", "syncsde")
# Here, standard library only, so requests validate without torch; backend/engine/sync/syncsde.py uses these.
SYNCSDE_COMPOSE = ("paper", "average")
DEFAULT_SYNCSDE_LAMBDA = 5.0  # the paper's wide-image lambda
DEFAULT_PREVIEW_EVERY = 5
"""--preview-every: a preview PNG of the canvas every 5th denoising step and the last (docs/engine.md, "Preview while
it paints", has its measured cost per step)."""
SYNC_LOSSES = ("lpips-vgg", "lpips-alex", "style")  # the names of backend/engine/perceptual.py
SYNC_LOSS_BACKBONES = ("auto", "pretrained", "random")
# SyncDiffusion's guidance weight w per loss: 20 for LPIPS (the paper's choice); for the style loss the
# supplementary (S.4) multiplies the loss by 10^6 and uses w = 0.1.
DEFAULT_SYNC_WEIGHTS = {"lpips-vgg": 20.0, "lpips-alex": 20.0, "style": 0.1}

# --views: which views a 360° (equirect) job denoises (backend/sphere/view_sets.py builds them). The names are
# here, standard library only, so that requests validate without torch.
VIEW_SETS = ("band", "cube", "ring", "band+poles")
"""Canonical view set names, in the order the help lists them."""

VIEW_SET_PARTS = ("band", "cube", "ring", "poles")
"""The words a view set name is made of, joined by ``+``."""

# Canonical name of each valid set of parts.
_CANONICAL = {frozenset({"band"}): "band", frozenset({"cube"}): "cube", frozenset({"ring"}): "ring",
              frozenset({"band", "poles"}): "band+poles"}

# Why a set of known parts is not a view set (the part of a sentence in parentheses).
_NOT_A_SET = {
    frozenset({"poles"}): "the up and down faces alone leave the middle latitudes unseen",
    frozenset({"cube", "poles"}): "cube already has the up and down faces",
    frozenset({"ring", "poles"}): "ring already has the up and down faces",
    frozenset({"cube", "ring"}): "ring already has the cube's faces",
    frozenset({"band", "cube"}): "crop windows combine only with the pole faces",
    frozenset({"band", "ring"}): "crop windows combine only with the pole faces",
}


def parse_view_set(name: str) -> str:
    """The canonical name (one of ``VIEW_SETS``) of a view set name given by a user.

    ``name``: parts from ``VIEW_SET_PARTS`` joined by ``+``, in any order, any case, spaces around
    parts ignored: ``"band"``, ``"cube"``, ``"ring"``, ``"band+poles"`` (also ``"Poles + band"``).
    Raises ValueError, with one sentence, for an unknown part or a combination that is not a view set
    (e.g. ``"cube+poles"``: cube already has the up and down faces).
    """
    choices = ", ".join(VIEW_SETS[:-1]) + " or " + VIEW_SETS[-1]
    parts = [part.strip().lower() for part in str(name).split("+")]
    for part in parts:
        if part not in VIEW_SET_PARTS:
            shown = f"{shorten(part)} in {shorten(name)}" if len(parts) > 1 else shorten(name)
            raise ValueError(f"Unknown view set {shown}; use {choices}.")
    key = frozenset(parts)
    if len(key) == len(parts) and key in _CANONICAL:
        return _CANONICAL[key]
    reason = _NOT_A_SET.get(key, "a part is repeated") if len(key) == len(parts) else "a part is repeated"
    raise ValueError(f"{shorten(name)} is not a view set ({reason}); use {choices}.")



# --mad-blocks: the UNet block groups whose attention MAD merges (backend/engine/sync/mad.py uses these).
MAD_BLOCKS = ("down", "mid", "up")


def parse_mad_blocks(blocks) -> tuple[str, ...]:
    """The block names of ``blocks`` (a sequence, or a comma-separated string such as "down,mid,up"),
    de-duplicated in the order of ``MAD_BLOCKS``. Raises ValueError, with one sentence, for an unknown or
    empty selection."""
    names = [name.strip() for name in (blocks.split(",") if isinstance(blocks, str) else blocks)]
    if not names or any(name not in MAD_BLOCKS for name in names):
        shown = blocks if isinstance(blocks, str) else ",".join(names)
        raise ValueError(f"--mad-blocks takes a comma-separated list of {', '.join(MAD_BLOCKS)}, not {shorten(shown)}.")
    return tuple(name for name in MAD_BLOCKS if name in names)


def check_syncsde_lambda(value: Any) -> float:
    """SyncSDE's strength lambda as a float: a finite number >= 0 (0: every view sampled on its own).
    Raises ValueError with one sentence otherwise."""
    if not _is_number(value) or value < 0:
        raise ValueError(f"--syncsde-lambda must be a number >= 0, not {shorten(value)}.")
    return float(value)

# --fusion: what is averaged where views overlap (docs/engine.md, "Fusion"). noisy: each view's x_{t-1}
# (MultiDiffusion); clean: Tweedie's x0, each view keeping its own noise (SyncTweedies); auto: noisy for
# crop windows only (exactly MultiDiffusion), clean as soon as the views include projected ones.
FUSIONS = ("auto", "noisy", "clean")
# --schedule: which views each denoising step runs (backend/sphere/schedules.py). dense: every overlapping window,
# every step (MultiDiffusion); shifted: windows that cover the canvas once, moved by a seeded offset every step
# (SpotDiffusion); auto: the measured default of the layout (DEFAULT_SCHEDULES; docs/engine.md, "View schedules"),
# dense wherever an option asks for overlapping windows (--stride, --fusion, --sync syncsde, --views ring or cube).
SCHEDULES = ("auto", "dense", "shifted")
# What --schedule auto runs per layout: the cheapest case of benchmarks/bench_schedules.py whose coherence was no
# worse than dense's (docs/engine.md, "Measured: which default per layout": at the product's 50 steps over 64
# seeds (tile 32), each difference confirmed by the 30-step run): tile: shifted, 1/64 of the UNet rows; wide and
# equirect: dense, as every cheaper case was worse on a metric in both runs (wide: stride window/2 on
# Intra-LPIPS, shifted on Intra-Style-L; equirect: shifted on the largest cube edge and Intra-LPIPS).
DEFAULT_SCHEDULES = {"wide": "dense", "equirect": "dense", "tile": "shifted"}
# The default --stride is window / DEFAULT_STRIDE_DIVISOR: MultiDiffusion's window/8 (8 latents for a 64 window).
DEFAULT_STRIDE_DIVISOR = 8
# --views when none is given and the canvas is tall enough for it (else band): the measured choice
# (docs/engine.md, "View sets"); backend/engine/resolve.py's choose_views decides, once the window is known.
DEFAULT_VIEW_SET = "band+poles"
# The view sets with the up and down faces, whose polar caps are decoded from those faces (backend/engine/decode.py).
POLE_FACE_VIEW_SETS = ("cube", "ring", "band+poles")
# A view whose centre is at least this far above (below) the horizon gets --prompt-up (--prompt-down).
UP_DOWN_PITCH = 45.0

# Starting from an image (--init-image, img2img) and upscaling (--upscale, ``python -m backend upscale``; issue 18).
START_IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".exr")
DEFAULT_STRENGTH = 0.8  # --strength with --init-image: diffusers' img2img default
UPSCALE_STRENGTH = 0.3  # the upscaling pass's strength: enough to draw the new detail, little enough to keep the image
UPSCALE_FACTORS = (2, 4)
MAX_UPSCALED_PIXELS = 8192 * 4096  # the largest image an upscale makes (issue 18: up to 8192x4096)
MAX_UPSCALED_SIDE = 8192
UPSCALE_STEPS = 20  # ``upscale``'s default --steps: at strength 0.3, 6 of them run
UPSCALE_PROMPT = "a detailed, sharp, high-resolution image"  # ``upscale`` without --prompt or metadata.json beside it

# Extending a photo into a world (--photo; issue 18): the horizontal fields of view a photo may have been taken
# with, both excluded (a pinhole camera sees less than 180°; below 1° the photo is a few equirect pixels).
PHOTO_FOV_RANGE = (1.0, 179.0)

# Canvas size (width, height) in pixels when the user gives none, per layout.
# 2048 x 1024 for 360°: the faces are then 512 px, Stable Diffusion's own scale, and band+poles fits.
DEFAULT_SIZES = {"wide": (2048, 512), "equirect": (2048, 1024), "tile": (512, 512)}


@dataclass(frozen=True)
class ModelGeometry:
    """What the engine needs to know about a model before loading it.

    vae_scale_factor: image pixels per latent pixel (8 for Stable Diffusion 1/2/XL).
    latent_channels: channels of the latent (4 for SD 1/2).
    sample_size: the UNet's training latent size, the default window (64 for SD2-base).
    """

    vae_scale_factor: int
    latent_channels: int
    sample_size: int


@dataclass(frozen=True)
class GenerateRequest:
    """Every parameter of one generation. See ``backend/app/cli.py`` for the meaning of each flag."""

    prompt: str
    negative_prompt: str = ""
    layout: str = "equirect"
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_SAMPLING[0]
    guidance: float = DEFAULT_SAMPLING[1]
    seed: int | None = None
    window: int | None = None
    stride: int | None = None
    view_batch: int | None = None  # None: chosen by the memory plan (engine/memory.py's choose_view_batch)
    scheduler: str = "auto"
    model: str = DEFAULT_MODEL
    model_config: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    unet_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    memory: str = "auto"
    quantize: str = "none"
    compile: bool = False
    out: str | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    views: str | None = None
    schedule: str = "auto"
    fusion: str = "auto"
    prompt_up: str = ""
    prompt_down: str = ""
    sync: str = "multidiffusion"
    sync_weight: float | None = None
    sync_decay: float = 0.95
    sync_steps: int | None = None
    sync_every: int = 1
    sync_anchor: str | int = "center"
    sync_loss: str = "lpips-vgg"
    sync_loss_backbone: str = "auto"
    sync_loss_size: int | None = None
    sync_decoder: str = "vae"
    sync_reuse_eps: bool = False
    sync_checkpointing: bool = False
    mad_steps: int = 0
    mad_blocks: str = "down,mid,up"
    syncsde_lambda: float = DEFAULT_SYNCSDE_LAMBDA
    syncsde_compose: str = "paper"
    syncsde_open_chain: bool = False
    no_hdr: bool = False
    exposure: float = 0.0
    sun_ratio: float = DEFAULT_SUN_RATIO
    sun_strength: float | None = None
    sun_direction: str | list | None = None
    half: bool = False
    preview_every: int = DEFAULT_PREVIEW_EVERY
    init_image: str | None = None
    strength: float | None = None  # None: DEFAULT_STRENGTH with --init-image
    upscale: int | None = None
    photo: str | None = None
    photo_fov: float | None = None  # required with --photo
    photo_yaw: float = 0.0
    photo_pitch: float = 0.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "GenerateRequest":
        """Build a request from a protocol ``params`` object; unknown names are a BadRequest."""
        if not isinstance(params, dict):
            raise BadRequest("The generate request's params must be a JSON object.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise BadRequest(f"Unknown parameter(s): {shorten(', '.join(unknown))[1:-1]}.")
        if "prompt" not in params:
            raise BadRequest("The request needs a prompt.")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """All parameters as a JSON-serialisable dict (what metadata.json records)."""
        return dataclasses.asdict(self)

    @property
    def cube_map(self) -> bool:
        """Whether the job also writes its panorama's cube map (faces, cross, strip): 360° equirect jobs do."""
        return self.layout == "equirect"

    @property
    def hdr(self) -> bool:
        """Whether the job makes HDR lighting (panorama.exr with the sun expanded, panorama_sky.exr,
        lighting.json; backend/products/hdr.py): 360° equirect jobs do, unless ``no_hdr``."""
        return self.layout == "equirect" and not self.no_hdr

    def validated(self) -> "GenerateRequest":
        """This request checked in everything that needs no model, as a new request with the defaults that
        need no model filled in: the layout's size, whole numbers for whole-number fields, the canonical view
        set name, the sun direction as [yaw, pitch], SyncDiffusion's weight and anchor, an absolute ``out``.
        The seed, window, stride and (without --views) the view set are decided later, once
        (``engine.resolve``). Raises BadRequest with one sentence naming the first problem."""
        request = SimpleNamespace(**self.to_dict())  # a mutable draft; the result is frozen again
        for check in (_check_types, _check_size, _check_sampling, _check_model_and_device, _check_views, _check_schedule,
                      _check_hdr, _check_sync, _check_syncdiffusion, _check_mad, _check_compile, _check_out,
                      _check_preview, _check_start_image, _check_upscale, _check_photo):
            check(request)
        return dataclasses.replace(self, **vars(request))

    def sized_for_model(self, geometry: ModelGeometry) -> "GenerateRequest":
        """This (validated) request with the model's default window and stride (window/8) filled in, after
        checking the sizes against the model (VAE factor, window). Raises BadRequest with one sentence naming the
        problem."""
        factor = geometry.vae_scale_factor
        for name, value in (("width", self.width), ("height", self.height)):
            if value % factor:
                raise BadRequest(
                    f"The {name} {value} px is not a multiple of this model's VAE factor {factor}; "
                    f"try {max(factor, value // factor * factor)}."
                )
        window = geometry.sample_size if self.window is None else self.window
        stride = max(1, window // DEFAULT_STRIDE_DIVISOR) if self.stride is None else self.stride
        if stride > window:
            raise BadRequest(f"--stride {stride} is larger than the window {window}; views would leave gaps.")
        latent_width, latent_height = self.width // factor, self.height // factor
        if latent_width < window or latent_height < window:
            raise BadRequest(
                f"The canvas {self.width}x{self.height} px is smaller than one window of "
                f"{window * factor} px; make it at least {window * factor} px in each direction "
                "or pass a smaller --window."
            )
        return dataclasses.replace(self, window=window, stride=stride)

    @property
    def needs_overlapping_windows(self) -> bool:
        """Whether an option of this request as asked (before ``sized_for_model`` fills in the stride) needs the
        dense schedule's overlapping windows: ``--stride``, ``--fusion`` other than auto, ``--sync syncsde``,
        ``--views ring`` or ``cube``. ``auto`` then resolves to dense, and an explicit ``shifted`` is refused
        (``_check_schedule``, which names the option)."""
        return (self.stride is not None or self.fusion != "auto" or self.sync == "syncsde"
                or self.views in ("ring", "cube"))

    @property
    def resolved_schedule(self) -> str:
        """``schedule`` with ``auto`` decided, for a validated request as asked: the layout's ``DEFAULT_SCHEDULES``
        entry, or "dense" when an option needs overlapping windows (``needs_overlapping_windows``)."""
        if self.schedule != "auto":
            return self.schedule
        return "dense" if self.needs_overlapping_windows else DEFAULT_SCHEDULES[self.layout]

    @property
    def resolved_fusion(self) -> str:
        """``fusion`` with ``auto`` decided: noisy for crop windows only, clean when projected views take part
        or a ``--photo`` is kept;
        "own" for SyncSDE, whose views keep their own states; "canvas" for the shifted schedule, whose windows
        own nothing (``sampler.sample_canvas``)."""
        if self.sync == "syncsde":
            return "own"
        if self.schedule == "shifted":
            return "canvas"
        if self.fusion != "auto":
            return self.fusion
        if self.photo is not None:  # the photo is kept in the fused clean latent (sampler.KnownRegion)
            return "clean"
        return "noisy" if self.views in (None, "band") else "clean"


# ---------------------------------------------------------------------------------------------- validation
# Each check reads and fills a draft of the request (a SimpleNamespace with its fields); ``validated`` runs them in
# order and freezes the result. Each raises BadRequest with one sentence.


TEXT_FIELDS = ("prompt", "negative_prompt", "prompt_up", "prompt_down")
"""The fields that are words for the model (the rest of the string fields are names and paths)."""


def _check_types(request: SimpleNamespace) -> None:
    """Every field holds a value of the type its annotation declares: protocol params arrive as any JSON value,
    so the rules that follow may rely on types. Booleans must be true or false (a string "false" is truthy);
    whole-number fields take whole, finite numbers (512.0 becomes 512); number fields finite ones; text fields
    valid Unicode of at most ``MAX_TEXT_CHARACTERS``."""
    for field in dataclasses.fields(GenerateRequest):
        value, kinds = getattr(request, field.name), field.type.split(" | ")
        flag = "--" + field.name.replace("_", "-")
        if value is None and "None" in kinds:
            continue
        if kinds[0] == "bool" and not isinstance(value, bool):
            raise BadRequest(f"{flag} is a switch (true or false), not {shorten(value)}.")
        if kinds[0] == "int":
            setattr(request, field.name, _int(field.name, value))
        if kinds[0] == "float" and not _is_number(value):
            raise BadRequest(f"{flag} must be a finite number, not {shorten(value)}.")
        if kinds[0] == "str" and not (isinstance(value, str) or _is_whole(value) and "int" in kinds
                                      or isinstance(value, list) and "list" in kinds):
            allowed = " or ".join({"str": "text", "int": "a whole number", "list": "a list"}[kind]
                                  for kind in kinds if kind != "None")
            raise BadRequest(f"{flag} must be {allowed}, not {shorten(value)}.")
        if field.name in TEXT_FIELDS:
            _check_text(flag, value)


def _check_text(flag: str, text: str) -> None:
    what = "The prompt" if flag == "--prompt" else flag
    if len(text) > MAX_TEXT_CHARACTERS:
        raise BadRequest(f"{what} has {len(text)} characters; at most {MAX_TEXT_CHARACTERS} are accepted "
                         "(the model reads about 75 words).")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRequest(f"{what} is not valid text: character {error.start + 1} is a byte that is not UTF-8 "
                         "(save or type the text as UTF-8).") from None


def _check_size(request: SimpleNamespace) -> None:
    """The prompt, the layout and the canvas size (the layout's default where none is given)."""
    if not request.prompt.strip():
        raise BadRequest("The prompt is empty; describe the scene with --prompt.")
    if request.layout not in LAYOUTS:
        raise BadRequest(f"Unknown layout {shorten(request.layout)}; choose one of {', '.join(LAYOUTS)}.")
    default_width, default_height = DEFAULT_SIZES[request.layout]
    if request.width is None and request.height is None:
        request.width, request.height = default_width, default_height
    elif request.layout == "equirect" and request.height is None:
        request.height = request.width // 2
    elif request.layout == "equirect" and request.width is None:
        request.width = request.height * 2
    elif request.width is None:
        request.width = default_width
    elif request.height is None:
        request.height = default_height
    for name, value in (("width", request.width), ("height", request.height)):
        if value < 1 or value > MAX_CANVAS_PIXELS:
            raise BadRequest(f"The {name} {shorten(value)} px is outside 1..{MAX_CANVAS_PIXELS} px.")
    if request.layout == "equirect" and request.width != 2 * request.height:
        raise BadRequest(
            f"An equirect canvas must be 2:1, but {request.width}x{request.height} is not; "
            f"use --width {2 * request.height} --height {request.height}."
        )


def _check_sampling(request: SimpleNamespace) -> None:
    """Steps, guidance, view batch, seed, window, stride."""
    if request.steps < 1:
        raise BadRequest(f"--steps must be at least 1, not {request.steps}.")
    if request.steps > MAX_STEPS:
        raise BadRequest(f"--steps {shorten(request.steps)} is more than the {MAX_STEPS} noise levels a Stable Diffusion "
                         "model is trained on; 20-50 steps are typical.")
    if request.guidance < 0:
        raise BadRequest(f"--guidance must be a number >= 0, not {request.guidance}.")
    if request.view_batch is not None and request.view_batch < 1:
        raise BadRequest(f"--view-batch must be at least 1, not {request.view_batch}.")
    if request.seed is not None:
        if not 0 <= request.seed < 2**63:
            raise BadRequest(f"--seed must be between 0 and 2^63-1, not {shorten(request.seed)}.")
    for name in ("window", "stride"):
        value = getattr(request, name)
        if value is not None and not 1 <= value <= MAX_CANVAS_PIXELS:
            raise BadRequest(f"--{name} must be a positive number of latent pixels, not {shorten(value)}.")


def _check_model_and_device(request: SimpleNamespace) -> None:
    """The scheduler name, dtype, memory mode, device and LoRA options."""
    if request.scheduler not in SCHEDULERS and not (
        isinstance(request.scheduler, str) and request.scheduler.endswith("Scheduler") and request.scheduler.isidentifier()
    ):
        raise BadRequest(
            f"Unknown scheduler {shorten(request.scheduler)}; choose one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name."
        )
    if request.dtype not in DTYPES:
        raise BadRequest(f"Unknown dtype {shorten(request.dtype)}; choose one of {', '.join(DTYPES)}.")
    if request.memory not in MEMORY_MODES:
        raise BadRequest(f"Unknown memory mode {shorten(request.memory)}; choose one of {', '.join(MEMORY_MODES)}.")
    if request.quantize not in QUANTIZE_MODES:
        raise BadRequest(f"Unknown quantisation {shorten(request.quantize)}; choose one of {', '.join(QUANTIZE_MODES)}.")
    if not (request.device in ("auto", "cpu", "mps", "cuda") or _is_cuda_index(request.device)):
        raise BadRequest(f"Unknown device {shorten(request.device)}; use {DEVICES_HELP}.")
    if request.lora is not None and not request.lora.strip():
        raise BadRequest("--lora must be a .safetensors file, a folder or a hub id of LoRA weights.")
    if request.unet_file is not None:
        _check_unet_file(request)


def _check_unet_file(request: SimpleNamespace) -> None:
    """--unet-file: an existing ``.safetensors`` file (made absolute), never a pickle, even with --allow-pickle:
    a whole UNet's weights that replace the model's (SDXL-Lightning's ``sdxl_lightning_4step_unet.safetensors``)."""
    path = os.path.abspath(os.path.expanduser(str(request.unet_file)))
    if not path.lower().endswith(".safetensors"):
        raise BadRequest(f"--unet-file takes UNet weights as a .safetensors file, not {shorten(os.path.basename(path))} "
                         "(pickled weights can run code when loaded and are not read here).")
    if not os.path.isfile(path):
        raise BadRequest(f"The --unet-file {path} does not exist.")
    request.unet_file = path


def _check_views(request: SimpleNamespace) -> None:
    """Check --views (its canonical name; equirect only), --fusion and the per-direction prompts."""
    if request.fusion not in FUSIONS:
        raise BadRequest(f"Unknown --fusion {shorten(request.fusion)}; choose one of {', '.join(FUSIONS)}.")
    if request.layout != "equirect":
        for name in ("views", "prompt_up", "prompt_down"):
            if getattr(request, name):
                raise BadRequest(f"--{name.replace('_', '-')} applies only to --layout equirect, "
                                 "where views can look up and down.")
        return
    if request.views is None:
        return
    try:
        request.views = parse_view_set(request.views)
    except ValueError as error:
        raise BadRequest(str(error)) from None


def _check_schedule(request: SimpleNamespace) -> None:
    """--schedule, and that an explicit ``shifted`` meets no option that needs overlapping windows."""
    if request.schedule not in SCHEDULES:
        raise BadRequest(f"Unknown --schedule {shorten(request.schedule)}; choose one of {', '.join(SCHEDULES)}.")
    if request.schedule != "shifted":
        return
    if request.sync == "syncsde":
        raise BadRequest("SyncSDE ties views where they overlap, and the shifted schedule's windows do not overlap; "
                         "use --schedule dense with --sync syncsde.")
    if request.fusion != "auto":
        raise BadRequest("The shifted schedule always fuses on the canvas (its windows move, so none keeps a state of "
                         "its own); leave --fusion out or use --schedule dense.")
    if request.stride is not None:
        raise BadRequest("--stride spaces the dense schedule's overlapping windows, and the shifted schedule's windows "
                         "do not overlap; leave --stride out or use --schedule dense.")
    if request.views in ("ring", "cube"):
        raise BadRequest(f"The {request.views} view set has no crop windows for the shifted schedule to move; "
                         "use --views band or band+poles, or --schedule dense.")


def _check_hdr(request: SimpleNamespace) -> None:
    """Check --no-hdr, --exposure, --sun-ratio, --sun-strength, --sun-direction and --half (``check_hdr_options``);
    store the sun direction as [yaw, pitch]. The lighting options apply only to equirect jobs, and only
    --sun-direction (which also prompts the views that see it) goes with --no-hdr; --exposure also tone-maps an
    --init-image (an EXR), so with one it goes with every layout and with --no-hdr."""
    changed = [name for name, default in (("exposure", 0.0), ("sun_ratio", DEFAULT_SUN_RATIO),
                                          ("sun_strength", None), ("sun_direction", None))
               if getattr(request, name) != default and not (name == "exposure" and request.init_image is not None)]
    if changed and request.layout != "equirect":
        raise BadRequest(f"--{changed[0].replace('_', '-')} applies only to --layout equirect, whose 360° image "
                         "can light a scene.")
    lighting = [name for name in changed if name != "sun_direction"]
    if lighting and request.no_hdr:
        raise BadRequest(f"--{lighting[0].replace('_', '-')} sets the HDR lighting that --no-hdr turns off; "
                         "leave one of them out.")
    direction = check_hdr_options(request.exposure, request.sun_ratio, request.sun_strength, request.sun_direction)
    request.sun_direction = list(direction) if direction is not None else None
    if request.half and request.layout == "equirect" and not request.no_hdr and request.exposure > HALF_EXPOSURE:
        raise BadRequest(f"--exposure {request.exposure:g} takes a white sky above the largest half float; "
                         f"use at most {HALF_EXPOSURE:g} with --half.")


def _check_sync(request: SimpleNamespace) -> None:
    """Check --sync, that each method's options go with it only, and SyncSDE's options."""
    if request.sync not in SYNC_METHODS:
        raise BadRequest(f"Unknown --sync {shorten(request.sync)}; choose one of {', '.join(SYNC_METHODS)}.")
    for prefix, method, name in (("sync_", "syncdiffusion", "SyncDiffusion"), ("syncsde_", "syncsde", "SyncSDE")):
        changed = [field.name for field in dataclasses.fields(GenerateRequest)
                   if field.name.startswith(prefix) and getattr(request, field.name) != field.default]
        if changed and request.sync != method:
            flag = "--" + changed[0].replace("_", "-")
            raise BadRequest(f"{flag} only applies to {name}; add --sync {method} or leave it out.")
    if request.sync == "syncsde":
        try:
            check_syncsde_lambda(request.syncsde_lambda)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        if request.syncsde_compose not in SYNCSDE_COMPOSE:
            raise BadRequest(f"Unknown --syncsde-compose {shorten(request.syncsde_compose)}; choose one of {', '.join(SYNCSDE_COMPOSE)}.")
        if request.fusion != "auto":
            raise BadRequest("--fusion does not apply to SyncSDE, whose views keep their own states; "
                             "use --syncsde-compose to choose how they are composed.")


def _check_syncdiffusion(request: SimpleNamespace) -> None:
    """SyncDiffusion's options (with --sync syncdiffusion only); fill the loss's default weight."""
    if request.sync != "syncdiffusion":
        return
    if request.sync_loss not in SYNC_LOSSES:
        raise BadRequest(f"Unknown --sync-loss {shorten(request.sync_loss)}; choose one of {', '.join(SYNC_LOSSES)}.")
    if request.sync_loss_backbone not in SYNC_LOSS_BACKBONES:
        raise BadRequest(
            f"Unknown --sync-loss-backbone {shorten(request.sync_loss_backbone)}; choose one of {', '.join(SYNC_LOSS_BACKBONES)}."
        )
    if request.sync_weight is None:
        request.sync_weight = DEFAULT_SYNC_WEIGHTS[request.sync_loss]
    if request.sync_weight < 0:
        raise BadRequest(f"--sync-weight must be a number >= 0, not {shorten(request.sync_weight)}.")
    if not 0 < request.sync_decay <= 1:
        raise BadRequest(f"--sync-decay must be a number in (0, 1], not {shorten(request.sync_decay)}.")
    if request.sync_steps is not None:
        if request.sync_steps < 0:
            raise BadRequest(f"--sync-steps must be 0 or more guided steps, not {request.sync_steps}.")
    if request.sync_every < 1:
        raise BadRequest(f"--sync-every must be at least 1, not {request.sync_every}.")
    if request.sync_anchor != "center":
        anchor = request.sync_anchor
        if isinstance(anchor, str) and anchor.strip().isdigit():
            anchor = int(anchor)
        if isinstance(anchor, bool) or not isinstance(anchor, int) or anchor < 0:
            raise BadRequest(f"--sync-anchor must be 'center' or a view index >= 0, not {shorten(request.sync_anchor)}.")
        request.sync_anchor = anchor
    if request.sync_loss_size is not None:
        if not 16 <= request.sync_loss_size <= 4096:
            raise BadRequest(f"--sync-loss-size must be between 16 and 4096 px, not {request.sync_loss_size}.")
    if not request.sync_decoder.strip():
        raise BadRequest("--sync-decoder must be vae, taesd, or a hub id or folder of a tiny autoencoder.")


def _check_mad(request: SimpleNamespace) -> None:
    """--mad-steps and --mad-blocks (``parse_mad_blocks``)."""
    if request.mad_steps < 0:
        raise BadRequest(f"--mad-steps must be 0 (off) or more steps, not {request.mad_steps}.")
    try:
        parse_mad_blocks(str(request.mad_blocks))  # the protocol sends the flag's text, never a list
    except ValueError as error:
        raise BadRequest(str(error)) from None


def _check_compile(request: SimpleNamespace) -> None:
    """--compile meets no option that changes the UNet under torch.compile: MAD swaps its attention processors,
    SyncDiffusion backpropagates through it."""
    if not request.compile:
        return
    if request.mad_steps:
        raise BadRequest("--compile cannot go with --mad-steps: merged attention swaps the UNet's attention processors "
                         "during the job, which the compiled UNet does not see; leave one of them out.")
    if request.sync == "syncdiffusion":
        raise BadRequest("--compile cannot go with --sync syncdiffusion, whose guidance backpropagates through the UNet "
                         "and the compiled UNet is built for inference only; leave one of them out.")


def _check_out(request: SimpleNamespace) -> None:
    """The output folder is given; made absolute. (Whether it may be written is ``products.files``' rule.)"""
    if not request.out:
        raise BadRequest("No output folder given; pass --out DIR.")
    request.out = os.path.abspath(os.path.expanduser(request.out))


def _check_preview(request: SimpleNamespace) -> None:
    """--preview-every is 0 (no previews) or a number of steps."""
    if request.preview_every < 0:
        raise BadRequest(f"--preview-every must be 0 (no previews) or a number of steps, not {request.preview_every}.")


def _check_start_image(request: SimpleNamespace) -> None:
    """--init-image (a .png, .jpg or .exr file that exists; made absolute) and --strength in (0, 1] (its default
    with an image), and that the strength leaves at least one of the --steps steps to run (``int(steps *
    strength)``, as diffusers' img2img counts them). Whether the file is a readable image is checked by
    ``app.job.check_request``, before the model loads."""
    if request.init_image is None:
        if request.strength is not None:
            raise BadRequest("--strength sets how much of --init-image is re-drawn; add --init-image FILE or leave it out.")
        return
    request.init_image = _image_file_path(request.init_image, "start image")
    if request.strength is None:
        request.strength = DEFAULT_STRENGTH
    if not 0 < request.strength <= 1:
        raise BadRequest(f"--strength must be a number in (0, 1] (the share of the steps that re-draws the image), "
                         f"not {shorten(request.strength)}.")
    if int(request.steps * request.strength) < 1:
        raise BadRequest(f"--strength {request.strength:g} of {request.steps} steps leaves no step to run; raise "
                         f"--steps to at least {math.ceil(1 / request.strength)} or the strength.")


def _image_file_path(path: str, what: str) -> str:
    """The absolute path of the image file ``path`` (``~`` expanded) that a request reads (``what``: "start image",
    "photo"); BadRequest with one sentence when it does not exist or is not a .png, .jpg or .exr file."""
    absolute = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(absolute):
        raise BadRequest(f"The {what} {shorten(path)} does not exist.")
    if os.path.splitext(absolute)[1].lower() not in START_IMAGE_TYPES:
        raise BadRequest(f"The {what} {shorten(path)} is not a .png, .jpg or .exr file.")
    return absolute


def _check_upscale(request: SimpleNamespace) -> None:
    """--upscale is 2 or 4, and the upscaled image is at most 8192 px a side and 8192x4096 px in all."""
    if request.upscale is None:
        return
    if request.upscale not in UPSCALE_FACTORS:
        raise BadRequest(f"--upscale must be 2 or 4, not {shorten(request.upscale)}.")
    check_upscaled_size(request.width * request.upscale, request.height * request.upscale)
    if int(request.steps * UPSCALE_STRENGTH) < 1:
        raise BadRequest(f"--upscale re-draws {UPSCALE_STRENGTH:g} of the {request.steps} steps, which leaves none to run; "
                         f"use at least --steps {math.ceil(1 / UPSCALE_STRENGTH)}.")


def _check_photo(request: SimpleNamespace) -> None:
    """--photo (a .png, .jpg or .exr file that exists, made absolute; equirect only) with --photo-fov inside
    PHOTO_FOV_RANGE (degrees, ends excluded), --photo-pitch in [-90, 90] and --photo-yaw wrapped into [-180, 180); a fusion that fuses
    clean latents, where the photo is kept (not --fusion noisy, not SyncSDE). Whether the file is a readable image
    is checked by ``app.job.check_request``, before the model loads."""
    if request.photo is None:
        for name, default in (("photo_fov", None), ("photo_yaw", 0.0), ("photo_pitch", 0.0)):
            if getattr(request, name) != default:
                raise BadRequest(f"--{name.replace('_', '-')} places the photo of --photo; add --photo FILE or leave it out.")
        return
    if request.layout != "equirect":
        raise BadRequest("--photo applies only to --layout equirect, the 360° world a photo is extended into.")
    request.photo = _image_file_path(request.photo, "photo")
    low, high = PHOTO_FOV_RANGE
    if request.photo_fov is None:
        raise BadRequest("--photo needs --photo-fov DEG, the horizontal field of view the photo was taken with.")
    if not low < request.photo_fov < high:
        raise BadRequest(f"--photo-fov must be between {low:g} and {high:g} degrees, not {request.photo_fov:g}.")
    if not -90.0 <= request.photo_pitch <= 90.0:
        raise BadRequest(f"--photo-pitch {request.photo_pitch:g}° is off the sphere; it must lie between -90 and 90.")
    request.photo_yaw = (request.photo_yaw + 180.0) % 360.0 - 180.0
    if request.sync == "syncsde":
        raise BadRequest("--photo cannot go with --sync syncsde, whose views keep their own states and fuse no clean "
                         "latent to keep the photo in; use --sync multidiffusion or syncdiffusion.")
    if request.fusion == "noisy":
        raise BadRequest("--photo is kept in the views' fused clean latent, which --fusion noisy does not make; "
                         "use --fusion clean or leave --fusion out.")


def check_upscaled_size(width: int, height: int) -> None:
    """Raise BadRequest with one sentence when an upscaled image of ``width`` x ``height`` px is larger than
    upscaling makes (``MAX_UPSCALED_SIDE`` a side, ``MAX_UPSCALED_PIXELS`` in all: 8192x4096)."""
    if max(width, height) > MAX_UPSCALED_SIDE or width * height > MAX_UPSCALED_PIXELS:
        raise BadRequest(f"The upscaled image would be {width}x{height} px, larger than the 8192x4096 px upscaling "
                         "goes to; use a smaller scale or a smaller image.")


def parse_sun_direction(value: Any) -> tuple[float, float]:
    """(yaw, pitch) in degrees of a --sun-direction: "YAW,PITCH" (the CLI) or a [yaw, pitch] pair (protocol
    params). Yaw is wrapped into [-180, 180); pitch must lie in [-90, 90]. Raises BadRequest with one sentence."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if isinstance(parts, (str, bytes)) or len(parts) != 2:
            raise ValueError
        yaw, pitch = (float(part) for part in parts)
        if any(isinstance(part, bool) for part in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise BadRequest(f"--sun-direction must be YAW,PITCH in degrees (e.g. 30,45), not {shorten(value)}.") from None
    if not (math.isfinite(yaw) and math.isfinite(pitch)):
        raise BadRequest(f"--sun-direction {yaw:g},{pitch:g} is not a direction: both angles must be finite.")
    if not -90.0 <= pitch <= 90.0:
        raise BadRequest(f"--sun-direction's pitch {pitch:g}° is off the sphere; it must lie between -90 and 90.")
    return (yaw + 180.0) % 360.0 - 180.0, pitch


def check_hdr_options(exposure: Any, sun_ratio: Any, sun_strength: Any, sun_direction: Any) -> tuple[float, float] | None:
    """Check the HDR lighting options (generation and ``python -m backend hdr``): ``exposure`` a finite EV within
    ±MAX_EXPOSURE, ``sun_ratio`` > 0, ``sun_strength`` None or > 0, ``sun_direction`` None or as
    ``parse_sun_direction``. Returns the sun direction (yaw, pitch) or None. Raises BadRequest with one sentence."""
    if not _is_number(exposure) or abs(exposure) > MAX_EXPOSURE:
        raise BadRequest(f"--exposure must be a number of EV between -{MAX_EXPOSURE:g} and {MAX_EXPOSURE:g}, not {shorten(exposure)}.")
    if not _is_number(sun_ratio) or sun_ratio <= 0:
        raise BadRequest(f"--sun-ratio must be a number > 0 (the sun's irradiance over the sky's; clear days "
                         f"are about 3-10), not {shorten(sun_ratio)}.")
    if sun_strength is not None and (not _is_number(sun_strength) or sun_strength <= 0):
        raise BadRequest(f"--sun-strength must be an irradiance > 0 in the EXR's units, not {shorten(sun_strength)}.")
    return None if sun_direction is None else parse_sun_direction(sun_direction)


def _int(name: str, value: Any) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise BadRequest(f"--{name.replace('_', '-')} must be a whole number, not {shorten(value)}.")
    return int(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_cuda_index(device: str) -> bool:
    return isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit()
