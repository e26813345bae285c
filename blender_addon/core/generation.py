"""What a Generate press sends to the backend, as plain Python (no bpy), so it is tested without Blender.

The scene settings (``properties.SyncSphereSettings``, or any object with the same attributes) become the
protocol's ``generate`` params (docs/protocol.md): the CLI's flag names in snake_case. The backend's defaults
come from the backend's own request module (``backend/request.py``, standard library only, shipped in the
extension), so the add-on never keeps a copy that could drift.
"""

import dataclasses
import json
import os
import random
import time

from ...backend import request
from .names import prompt_slug

# Every generate param's value when it is not sent: the defaults of the backend's GenerateRequest.
BACKEND_DEFAULTS = {field.name: field.default for field in dataclasses.fields(request.GenerateRequest)
                    if field.default is not dataclasses.MISSING}

# Mode -> the backend's --layout.
LAYOUT_OF_MODE = {"WORLD": "equirect", "TILE": "tile", "WIDE": "wide"}

# Resolution presets per mode: (width, height) in pixels for DRAFT, STANDARD and HIGH, for a model whose views are
# 512 px (SD 1.x, SD2-base); they scale with the model's view size (``resolution``), so a preset has the same number
# of views whatever the model: an SDXL world (1024 px views) is 2048x1024 at Draft, never smaller than one view tall and two wide.
RESOLUTION_WINDOW_PX = 512
RESOLUTIONS = {
    "WORLD": {"DRAFT": (1024, 512), "STANDARD": (2048, 1024), "HIGH": (4096, 2048), "ULTRA": (8192, 4096)},
    "TILE": {"DRAFT": (512, 512), "STANDARD": (1024, 1024), "HIGH": (2048, 2048), "ULTRA": (4096, 4096)},
    "WIDE": {"DRAFT": (2048, 512), "STANDARD": (3072, 768), "HIGH": (4096, 1024), "ULTRA": (8192, 2048)},
}
# Presets made by generating at 1/factor of the size and upscaling (the backend's --upscale: img2img of the enlarged
# image with the same views, docs/engine.md "Start from an image, upscale"), far cheaper than denoising 8K from
# noise: preset -> factor.
UPSCALED_PRESETS = {"ULTRA": 2}
# The Size menu's Custom: the panel's Width and Height (``settings.custom_width`` / ``custom_height``), as typed.
CUSTOM_SIZE = "CUSTOM"
# The largest image the add-on asks for: the backend's upscaling limit (8192 px a side, 8192x4096 in all).
MAX_SIDE_PX = request.MAX_UPSCALED_SIDE
MAX_PIXELS = request.MAX_UPSCALED_PIXELS
# A custom size's sides are multiples of this: the VAE factor of every Stable Diffusion family the add-on lists.
SIZE_STEP_PX = 8

MAX_SEED = 2**31 - 1  # Blender's IntProperty is 32-bit signed

# Variations: how many images one Generate press makes at most (one job each, one after another).
MAX_VARIATIONS = 8

# Style presets (the main panel's Style menu): (identifier, name, description, style prompt, negative prompt).
# Picking one fills the panel's Style Prompt and Avoid fields with its two texts, which the artist then sees and
# may edit (operators/generate.py, SYNCSPHERE_OT_apply_style); Generate sends the prompt followed by the Style
# Prompt (``styled_prompt``) and Avoid as the negative prompt. Short, model-neutral words: they add a look, the
# prompt still says what is there.
STYLES = (
    ("NONE", "None", "Only your prompt", "", ""),
    ("PHOTOGRAPHIC", "Photographic", "A photograph: natural light, realistic detail",
     "photograph, natural light, realistic, highly detailed",
     "painting, drawing, illustration, cartoon, 3d render, blurry, low quality"),
    ("PAINTERLY", "Painterly", "An oil painting with visible brush strokes",
     "oil painting, visible brush strokes, rich colours, painterly",
     "photograph, photo, 3d render, smooth, blurry, low quality"),
    ("STYLISED", "Stylised / Game", "A stylised game environment: hand-painted, clean shapes, vivid colours",
     "stylised game environment, hand-painted textures, clean shapes, vibrant colours",
     "photograph, photorealistic, noisy, cluttered, blurry, low quality"),
    ("SCIFI", "Sci-fi", "Science fiction concept art: futuristic, cinematic light",
     "science fiction, futuristic, concept art, cinematic lighting, highly detailed",
     "medieval, rustic, blurry, low quality"),
    ("FANTASY", "Fantasy", "Fantasy matte painting: magical, epic atmosphere",
     "fantasy, matte painting, magical atmosphere, epic, highly detailed",
     "modern, photograph, blurry, low quality"),
)
STYLE_TEXTS = {identifier: (style_prompt, negative) for identifier, _, _, style_prompt, negative in STYLES}
STYLE_NAMES = {identifier: name for identifier, name, _, _, _ in STYLES}
DEFAULT_STYLE = "NONE"

# Quality (the main panel's speed / quality choice): (identifier, name, description, the request fields it
# sends). The one table of what each choice means, from the backend's measurement (docs/engine.md, "View
# schedules"): Balanced is what it measured as the cheapest coherent schedule per layout. The fields are defaults under the Advanced settings (generate_params):
# - its synchronisation fields (those named sync*) go only while Advanced Synchronisation is "From Quality"
#   (SYNC_FROM_QUALITY); a method chosen there sends its own fields instead, never a mix of the two;
# - its "schedule" becomes "dense" when another setting needs overlapping windows that the shifted schedule
#   does not have (an explicit Stride, SyncSDE, the Ring or Cube view set: the backend's
#   GenerateRequest.needs_overlapping_windows), since the backend refuses "shifted" with them.
QUALITIES = (
    ("FAST", "Fast",
     "Windows that cover the image once and move every step (the shifted schedule): the fastest, 5-12x fewer "
     "views than Balanced on wide panoramas and worlds; distant parts of a panorama may drift apart",
     {"schedule": "shifted"}),
    ("BALANCED", "Balanced",
     "The backend's measured default for each mode: the cheapest schedule that kept the image as coherent as "
     "Best's. Today shifted windows for a texture (as Fast); for a wide panorama and a 360 world, every "
     "overlapping window (as Best), as every cheaper schedule measured slightly less coherent there",
     {}),  # the backend's --schedule auto, which is never sent
    ("BEST", "Best",
     "Every overlapping window every step, 1/8 of a view apart (the dense schedule, MultiDiffusion): the "
     "slowest, the most overlap between views",
     {"schedule": "dense"}),
)
QUALITY_PARAMS = {identifier: fields for identifier, _, _, fields in QUALITIES}
QUALITY_NAMES = {identifier: name for identifier, name, _, _ in QUALITIES}
DEFAULT_QUALITY = "BALANCED"

# Advanced Synchronisation's default: the method and its options come from Quality (QUALITY_PARAMS).
SYNC_FROM_QUALITY = "AUTO"
# Synchronisation method -> the backend's --sync. The backend's default (MultiDiffusion) is never sent.
# Each method's own params go only with it: the backend refuses sync_* (SyncDiffusion's) without
# --sync syncdiffusion and syncsde_* without --sync syncsde.
SYNC_OF_METHOD = {"MULTIDIFFUSION": "multidiffusion", "SYNCDIFFUSION": "syncdiffusion", "SYNCSDE": "syncsde"}

# "Merged Attention" (MAD) is active for this fraction of the steps: the paper's 15 of 50. Its layout-setting
# effect lives in the early steps, and it costs memory (every view in one batch) only while active.
MAD_FRACTION = 0.3

# "Fast Guidance": the backend's approximate SyncDiffusion (docs/engine.md, "SyncDiffusion"): the tiny
# autoencoder decodes for the guidance, the gradient pass's prediction is reused, the loss runs at 256 px.
FAST_SYNC_PARAMS = {"sync_decoder": "taesd", "sync_reuse_eps": True, "sync_loss_size": 256}

# View set (properties.VIEW_SET_ITEMS) -> the backend's --views. AUTO is missing on purpose: nothing is sent and
# the backend picks band+poles when the canvas is tall enough, else band; only it can tell, as that depends on
# the model's window.
VIEWS_OF_SET = {"BAND": "band", "BAND_POLES": "band+poles", "RING": "ring", "CUBE": "cube"}

# Start from Image's Strength by default: the backend's (diffusers' img2img default).
DEFAULT_STRENGTH = request.DEFAULT_STRENGTH
# Extend Photo (World mode; the backend's --photo): a phone's main camera sees about 60-70° across.
DEFAULT_PHOTO_FOV = 60.0
PHOTO_FOV_RANGE = request.PHOTO_FOV_RANGE

# SyncDiffusion's coherence weight: the backend's for its default perceptual loss, which the add-on never changes.
DEFAULT_SYNC_WEIGHT = request.DEFAULT_SYNC_WEIGHTS[BACKEND_DEFAULTS["sync_loss"]]
# SyncSDE's pull strength lambda.
DEFAULT_SYNCSDE_LAMBDA = BACKEND_DEFAULTS["syncsde_lambda"]

# The backend's defaults for a 360° World's HDR (--exposure, --sun-ratio): equal values are not sent.
DEFAULT_EXPOSURE = BACKEND_DEFAULTS["exposure"]
DEFAULT_SUN_RATIO = BACKEND_DEFAULTS["sun_ratio"]
# Blender keeps float settings in single precision (0.3 reads back 0.30000001192092896): the lighting
# values are sent rounded to this many decimals, more than the panel shows.
LIGHTING_DECIMALS = 4


def resolution(mode, preset, window_px=RESOLUTION_WINDOW_PX):
    """(width, height) in pixels of a resolution ``preset`` (DRAFT, STANDARD, HIGH, ULTRA) for ``mode`` with a model
    whose native views are ``window_px`` pixels (``model_list.native_window_px``): RESOLUTIONS scaled by
    ``window_px`` / RESOLUTION_WINDOW_PX, each side a multiple of 64 px, then shrunk (same aspect, rounded down to
    64 px) to at most MAX_SIDE_PX a side and MAX_PIXELS in all: an SDXL world at Ultra is 8192x4096, not 16K."""
    width, height = RESOLUTIONS[mode][preset]
    scale = window_px / RESOLUTION_WINDOW_PX
    width, height = (max(64, round(width * scale / 64) * 64), max(64, round(height * scale / 64) * 64))
    shrink = min(1.0, MAX_SIDE_PX / max(width, height), (MAX_PIXELS / (width * height)) ** 0.5)
    if shrink < 1.0:
        width, height = (max(64, int(width * shrink) // 64 * 64), max(64, int(height * shrink) // 64 * 64))
    return width, height


def canvas_size(settings, window_px=RESOLUTION_WINDOW_PX):
    """(width, height) in pixels of the image Generate makes for ``settings``: the Size preset's (``resolution``),
    or with Size CUSTOM_SIZE ``settings.custom_width`` x ``settings.custom_height`` as typed (checked by
    ``preflight.custom_size_problem``)."""
    if settings.resolution == CUSTOM_SIZE:
        return int(settings.custom_width), int(settings.custom_height)
    return resolution(settings.mode, settings.resolution, window_px)


def size_params(settings, window_px=RESOLUTION_WINDOW_PX):
    """The size params of ``settings``: ``width`` and ``height`` (``canvas_size``); for an UPSCALED_PRESETS preset
    the size divided by its factor and ``upscale``, so the backend generates the smaller image and upscales it to
    ``canvas_size``."""
    width, height = canvas_size(settings, window_px)
    factor = UPSCALED_PRESETS.get(settings.resolution)
    if factor is None:
        return {"width": width, "height": height}
    return {"width": width // factor, "height": height // factor, "upscale": factor}


def styled_prompt(prompt, style_prompt):
    """The prompt Generate sends: ``prompt`` followed by the Style Prompt (", " between; either may be blank)."""
    return ", ".join(text for text in (prompt.strip(), style_prompt.strip()) if text)


def variation_seeds(settings, count, rng=random):
    """The seeds of ``count`` variations: with ``settings.randomize_seed`` ``count`` different random seeds, else
    ``settings.seed``, seed + 1, ... (wrapping past MAX_SEED to 0). Returns a list of ints in 0..MAX_SEED."""
    count = max(1, min(int(count), MAX_VARIATIONS))
    if settings.randomize_seed:
        return rng.sample(range(MAX_SEED + 1), count)
    return [(int(settings.seed) + number) % (MAX_SEED + 1) for number in range(count)]


def generate_params(settings, seed, *, model, device, window_px=RESOLUTION_WINDOW_PX, init_image=None, photo=None):
    """The protocol's generate params for ``settings`` with ``seed``.

    ``width`` / ``height`` (and ``upscale`` for the Ultra preset): the Size for the model's view size
    ``window_px`` (``size_params``).
    ``init_image``: the absolute path of the start image (Start from Image's file, or the World's image saved for
    the backend), None to start from noise; with it ``strength`` (``settings.strength``, rounded to
    LIGHTING_DECIMALS).
    ``photo``: the absolute path of Extend Photo's file, None without one; in WORLD mode it is sent as ``photo`` with
    ``photo_fov``, ``photo_yaw`` and ``photo_pitch`` from ``settings`` (degrees, rounded to LIGHTING_DECIMALS; the
    backend extends only 360° worlds, so another mode sends none of them).
    ``prompt``: the prompt and the Style Prompt (``styled_prompt``); ``negative_prompt``: Avoid (which a style
    fills too).
    model: hub id or local path (the preferences' default model); device: auto, cuda, mps or cpu.
    ``memory`` is always sent, from ``settings.memory`` (auto, full or low: the backend's --memory);
    ``quantize`` (``settings.quantize``) when it is not "none".
    ``settings.window`` / ``settings.stride`` of 0 leave the backend's defaults (from the model).
    The synchronisation (``synchronisation_params``): Quality's while ``settings.sync_method`` is
    SYNC_FROM_QUALITY, else the method's own. ``schedule``: Quality's, made dense where the other params need
    overlapping windows (``quality_schedule``).
    With ``settings.mad`` (any method): ``mad_steps``, MAD_FRACTION of the steps rounded, at least 1; nothing
    mad-related when it is off (the backend's default, 0 = off).
    In WORLD mode only (the backend refuses them for the other layouts): ``views`` from ``settings.view_set``
    (VIEWS_OF_SET; none with AUTO, the backend's own choice), and ``prompt_up`` / ``prompt_down`` when
    ``settings.prompt_up`` / ``settings.prompt_down`` are not blank (stripped). Also in WORLD mode only, the
    HDR lighting (lighting_params): ``no_hdr`` when ``settings.hdr`` is off; with HDR, ``exposure`` /
    ``sun_ratio`` when they differ from the backend's defaults; ``sun_direction`` when
    ``settings.use_sun_direction``, with or without HDR.
    """
    params = {
        "prompt": styled_prompt(settings.prompt, settings.style_prompt),
        "negative_prompt": settings.negative_prompt,
        "layout": LAYOUT_OF_MODE[settings.mode],
        **size_params(settings, window_px),
        "steps": int(settings.steps),
        "guidance": float(settings.guidance),
        "seed": int(seed),
        "model": model,
        "device": device,
        "memory": settings.memory,
    }
    if settings.quantize != "none":
        params["quantize"] = settings.quantize
    if init_image is not None:
        params["init_image"] = init_image
        params["strength"] = round(float(settings.strength), LIGHTING_DECIMALS)
    if settings.window:
        params["window"] = int(settings.window)
    if settings.stride:
        params["stride"] = int(settings.stride)
    if settings.mode == "WORLD":
        if settings.view_set in VIEWS_OF_SET:
            params["views"] = VIEWS_OF_SET[settings.view_set]
        # Sent only when set: the backend refuses a per-direction prompt that no view of the set looks towards.
        for name in ("prompt_up", "prompt_down"):
            text = getattr(settings, name).strip()
            if text:
                params[name] = text
        params.update(lighting_params(settings))
        if photo is not None:
            params["photo"] = photo
            for name in ("photo_fov", "photo_yaw", "photo_pitch"):
                params[name] = round(float(getattr(settings, name)), LIGHTING_DECIMALS)
    params.update(synchronisation_params(settings))
    if settings.mad:
        # At least one step, so a very short run still gets what was asked for.
        params["mad_steps"] = max(1, round(MAD_FRACTION * int(settings.steps)))
    schedule = quality_schedule(settings.quality, params)
    if schedule is not None:
        params["schedule"] = schedule
    return params


def synchronisation_params(settings):
    """The synchronisation params of ``settings``.

    ``settings.sync_method`` SYNC_FROM_QUALITY: the sync* fields of Quality's QUALITY_PARAMS entry, as they are.
    A method chosen in Advanced sends its own fields and none of Quality's: with SyncDiffusion ``sync``,
    ``sync_weight`` and ``sync_steps`` (left out when ``settings.sync_steps`` is 0, which means every step), plus
    FAST_SYNC_PARAMS when ``settings.sync_fast``; with SyncSDE ``sync`` and ``syncsde_lambda`` only; with
    MultiDiffusion nothing (the backend's default).
    """
    if settings.sync_method == SYNC_FROM_QUALITY:
        return {name: value for name, value in QUALITY_PARAMS[settings.quality].items() if name.startswith("sync")}
    params = {}
    sync = SYNC_OF_METHOD[settings.sync_method]
    if sync != BACKEND_DEFAULTS["sync"]:
        params["sync"] = sync
    if sync == "syncdiffusion":
        params["sync_weight"] = float(settings.sync_weight)
        if settings.sync_steps:
            params["sync_steps"] = int(settings.sync_steps)
        if settings.sync_fast:
            params.update(FAST_SYNC_PARAMS)
    elif sync == "syncsde":
        params["syncsde_lambda"] = float(settings.syncsde_lambda)
    return params


def quality_schedule(quality, params):
    """The ``schedule`` to send for ``quality`` with the other generate ``params``: QUALITY_PARAMS' schedule,
    except "dense" in place of "shifted" when ``params`` need overlapping windows (the backend's own rule,
    ``GenerateRequest.needs_overlapping_windows``: an explicit stride, SyncSDE, the ring or cube view set), which
    the backend would refuse with "shifted". None when the quality sets no schedule (the backend's auto)."""
    schedule = QUALITY_PARAMS[quality].get("schedule")
    if schedule == "shifted" and request.GenerateRequest(**params).needs_overlapping_windows:
        return "dense"
    return schedule


def schedule_note(settings):
    """A short sentence for the panel when Advanced settings turn Quality's shifted schedule into the dense one
    (``quality_schedule``), so the slower run is not a surprise; None otherwise."""
    if QUALITY_PARAMS[settings.quality].get("schedule") != "shifted":
        return None
    if generate_params(settings, 0, model=BACKEND_DEFAULTS["model"], device="auto").get("schedule") == "shifted":
        return None
    return "Dense schedule (slower): Stride, SyncSDE, Ring or Cube need it"


def format_direction(yaw, pitch):
    """The backend's --sun-direction value "YAW,PITCH" (degrees, at most LIGHTING_DECIMALS decimals, no
    trailing zeros): yaw positive turns right from the image centre, pitch positive looks up."""
    texts = [repr(round(float(value), LIGHTING_DECIMALS) + 0.0) for value in (yaw, pitch)]  # + 0.0: no "-0"
    return ",".join(text[:-2] if text.endswith(".0") else text for text in texts)


def lighting_params(settings):
    """The HDR params of a 360° World (generate_params adds them in WORLD mode only).

    ``sun_direction`` ("YAW,PITCH", format_direction) whenever ``settings.use_sun_direction``: it also asks
    the views that see it for the sun, with or without HDR. ``settings.hdr`` off: ``no_hdr``, and neither
    exposure nor ratio (the backend refuses them with --no-hdr). On: ``exposure`` (EV) and ``sun_ratio``
    when they differ from DEFAULT_EXPOSURE / DEFAULT_SUN_RATIO (rounded to LIGHTING_DECIMALS); nothing at
    all with the defaults.
    """
    params = {}
    if settings.use_sun_direction:
        params["sun_direction"] = format_direction(settings.sun_yaw, settings.sun_pitch)
    if not settings.hdr:
        params["no_hdr"] = True
        return params
    exposure = round(float(settings.exposure), LIGHTING_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    if exposure != DEFAULT_EXPOSURE:
        params["exposure"] = exposure
    sun_ratio = round(float(settings.sun_ratio), LIGHTING_DECIMALS)
    if sun_ratio != DEFAULT_SUN_RATIO:
        params["sun_ratio"] = sun_ratio
    return params


def read_metadata(metadata_path):
    """A finished job's metadata.json (a path) as a dict; an empty dict when there is none or it cannot be read
    (e.g. a path of None, a file from an interrupted write)."""
    try:
        with open(metadata_path, encoding="utf-8") as file:
            metadata = json.load(file)
    except (OSError, ValueError, TypeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def result_warnings(metadata_path):
    """Sentences an artist should read about a finished job, from its metadata.json (a path): today, that
    SyncDiffusion's perceptual loss ran with a random network because the ImageNet one was not available
    (Blender's online access off and nothing cached), so its guidance followed random features.
    Returns a list of sentences (empty when there is nothing to say or the file cannot be read)."""
    metadata = read_metadata(metadata_path)
    sync = metadata.get("syncdiffusion") or {}
    if sync.get("loss_pretrained") is False:
        return [f"SyncDiffusion's perceptual loss ran with a random network ({sync.get('loss_backbone', 'no ImageNet weights')}), "
                "so its coherence guidance did little; allow online access once (Preferences > System > Network > "
                "Allow Online Access) "
                "so the backend can download it"]
    return []


def run_summary(metadata_path):
    """How a finished job ran, in a few words for its history item, from its metadata.json (a path): the view
    schedule and the views each denoising step ran, e.g. "Shifted schedule, 2.5 views per step (2-3)" or
    "Dense schedule, 16 views per step". "" when the file cannot be read or predates the schedules."""
    metadata = read_metadata(metadata_path)
    schedule, per_step = metadata.get("schedule"), metadata.get("views_per_step")
    if not isinstance(schedule, str) or not isinstance(per_step, dict):
        return ""
    try:
        mean, low, high = (float(per_step[name]) for name in ("mean", "min", "max"))
    except (KeyError, TypeError, ValueError):
        return f"{schedule.capitalize()} schedule"
    views = f"{round(mean, 1):g} views per step"
    if low != high:  # the shifted schedule's windows vary from step to step
        views += f" ({low:g}-{high:g})"
    return f"{schedule.capitalize()} schedule, {views}"


def job_folder(output_root, prompt, seed, now=None):
    """A new folder path under ``output_root`` for one job: ``YYYYmmdd-HHMMSS-<prompt slug>-<seed>`` (the slug:
    ``names.prompt_slug``, e.g. "sunlit-alpine-valley-lake").

    The folder is not created (the backend creates it, atomically, when it writes the result).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    words = prompt_slug(prompt)
    folder = os.path.join(output_root, f"{stamp}-{words}-{seed}")
    suffix = 1
    while os.path.exists(folder):  # two jobs within a second with the same prompt and seed
        suffix += 1
        folder = os.path.join(output_root, f"{stamp}-{words}-{seed}-{suffix}")
    return folder
