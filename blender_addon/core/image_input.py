"""Images into the backend (issue 18), as plain Python (no bpy), tested without Blender: Start from Image (a file, or
the scene's World's image) and Upscale x2 / x4 of a history item.

Both are ordinary generate jobs of the protocol (docs/protocol.md): a start image is ``init_image`` with
``strength``; an upscale of a finished image is the same, with the image as the start, the canvas ``scale`` times
its size and the backend's upscaling strength (what ``python -m backend upscale`` builds: backend/app/cli.py,
``upscale_request``). So both run through Generate's worker, job and history unchanged.
"""

import math
import struct
import types

from ...backend import request
from .generation import LAYOUT_OF_MODE, lighting_params, quality_schedule, styled_prompt

# Start from Image (``settings.start_image_source``): noise (the default), a file, or the scene's World's image.
START_FROM_NOISE = "NONE"
START_FROM_FILE = "FILE"
START_FROM_WORLD = "WORLD"

# The files the backend starts from (.png, .jpg, .exr): another kind of World image is saved as one of these.
START_IMAGE_TYPES = request.START_IMAGE_TYPES

# Upscale's factors (the backend's): the History's x2 and x4 buttons.
UPSCALE_FACTORS = request.UPSCALE_FACTORS
# The share of the steps an upscale re-draws: the backend's (enough to draw new detail, little enough to keep the image).
UPSCALE_STRENGTH = request.UPSCALE_STRENGTH
# The sides of an upscaled image are whole latents: multiples of 8 px, as the backend's upscale command rounds them.
UPSCALE_ROUND_PX = 8

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) in pixels of the PNG at ``path``, read from its header (IHDR); None when the file cannot be
    read or is not a PNG."""
    try:
        with open(path, "rb") as file:
            header = file.read(24)
    except (OSError, TypeError, ValueError):
        return None
    if len(header) < 24 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", header[16:24])


def upscaled_size(mode, size, scale):
    """(width, height) of an image of ``size`` (width, height) upscaled ``scale`` times for ``mode`` (WORLD, TILE,
    WIDE): each side times ``scale`` rounded down to UPSCALE_ROUND_PX; a World stays 2:1 (its width twice its
    height), as the backend's upscale command makes it."""
    width, height = size
    new_height = height * scale // UPSCALE_ROUND_PX * UPSCALE_ROUND_PX
    new_width = 2 * new_height if mode == "WORLD" else width * scale // UPSCALE_ROUND_PX * UPSCALE_ROUND_PX
    return new_width, new_height


def upscale_steps(steps):
    """The ``steps`` of an upscale of an image made with ``steps`` steps: the same, raised so that UPSCALE_STRENGTH
    of them leaves at least one step to run (4 at strength 0.3)."""
    return max(int(steps), math.ceil(1 / UPSCALE_STRENGTH))


def upscale_params(values, png_path, size, scale, run, *, model, device):
    """The protocol's generate params that upscale a finished image ``scale`` (2 or 4) times.

    values: the history item's settings (``results.history_values`` of the item: prompts, mode, seed-independent
    sampling, quality, lighting); png_path: the absolute path of its PNG (the start image, as the model painted
    it); size: the PNG's (width, height) (``png_size``); run: how to run it now (the scene settings: ``window``,
    ``stride``, ``memory`` and ``quantize``, as for Generate); model and device: as for Generate. The seed is the item's
    ``values["seed"]``.
    Returns params with ``init_image`` = png_path, ``strength`` UPSCALE_STRENGTH, the canvas ``upscaled_size``,
    ``steps`` ``upscale_steps`` of the item's, the item's prompts, guidance and quality's schedule, and for a World
    its lighting (``lighting_params``: the HDR and cube map are made from the upscaled image).
    """
    width, height = upscaled_size(values["mode"], size, scale)
    params = {
        "prompt": styled_prompt(values["prompt"], values["style_prompt"]),
        "negative_prompt": values["negative_prompt"],
        "layout": LAYOUT_OF_MODE[values["mode"]],
        "width": width,
        "height": height,
        "steps": upscale_steps(values["steps"]),
        "guidance": float(values["guidance"]),
        "seed": int(values["seed"]),
        "model": model,
        "device": device,
        "memory": run.memory,
        **({"quantize": run.quantize} if run.quantize != "none" else {}),
        "init_image": png_path,
        "strength": UPSCALE_STRENGTH,
    }
    if run.window:
        params["window"] = int(run.window)
    if run.stride:
        params["stride"] = int(run.stride)
    if values["mode"] == "WORLD":
        params.update(lighting_params(types.SimpleNamespace(**values)))
    schedule = quality_schedule(values["quality"], params)
    if schedule is not None:
        params["schedule"] = schedule
    return params
