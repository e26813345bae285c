"""The small commands that work on image files: ``cubemap``, ``view``, ``hdr`` and ``metrics``.

Each has its parser here (``add_file_commands``) and runs through ``run_file_command``: one sentence on stderr
and exit code 2 for bad input (``command_errors.one_sentence_errors``), nothing half-written. ``cubemap`` and
``hdr`` replace their set of files in --out as a unit and ``view`` its one file (``products.files``), holding
--out's lock from the check to the end, so a second run into it is refused at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..request import DEFAULT_SUN_RATIO, LAYOUTS, SYNC_LOSS_BACKBONES
from .command_errors import one_sentence_errors


def add_file_commands(commands) -> None:
    """Add ``cubemap``, ``view``, ``hdr`` and ``metrics`` to ``commands`` (argparse sub-parsers)."""
    for add in (_add_cubemap_command, _add_view_command, _add_hdr_command, _add_metrics_command):
        add(commands)


def run_file_command(args: argparse.Namespace) -> int:
    """Run the parsed file command ``args.command``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    return FILE_COMMANDS[args.command](args)


def _add_cubemap_command(commands) -> None:
    """``cubemap``: an equirect image's six faces and cross (``products.cubemap``)."""
    cubemap = commands.add_parser(
        "cubemap", help="cut a 360° equirect image into six cube faces and a cross",
        description="Cut a 2:1 equirectangular panorama into the six cube faces face_F, face_R, face_B, face_L, "
        "face_U, face_D and the cross cubemap_dice (py360convert's orientation and layout), written into --out: "
        "float EXRs for an .exr panorama, 8-bit PNGs for a .png one.",
    )
    cubemap.add_argument("panorama", help="the equirectangular image, .exr (linear) or .png")
    cubemap.add_argument("--out", required=True, help="output folder for the face and cross images")
    cubemap.add_argument("--face-size", type=int, help="width and height of each face in px (default: the panorama's width / 4)")
    cubemap.add_argument("--overwrite", action="store_true", help="replace existing cube map files in --out")


def _add_view_command(commands) -> None:
    """``view``: a perspective view of an equirect image (``products.perspective_view``)."""
    view = commands.add_parser(
        "view", help="render a perspective view of a 360° equirect image",
        description="Render a square perspective view of a 2:1 equirectangular panorama into the file --out "
        "(docs/engine.md, \"Sphere geometry\"): a float EXR for an .exr panorama, an 8-bit PNG for a .png one. "
        "Angles in degrees: yaw positive turns right, pitch positive looks up, roll positive banks right "
        "(the scene turns counter-clockwise in the picture); yaw 0, pitch 0 looks at the image centre.",
    )
    view.add_argument("panorama", help="the equirectangular image, .exr (linear) or .png")
    view.add_argument("--yaw", type=float, required=True, help="degrees to the right of the image centre")
    view.add_argument("--pitch", type=float, required=True, help="degrees above the horizon")
    view.add_argument("--roll", type=float, default=0.0, help="degrees the camera banks right, clockwise about its view axis (default 0)")
    view.add_argument("--fov", type=float, required=True, help="field of view in degrees, horizontal and vertical, between 0 and 180")
    view.add_argument("--size", type=int, required=True, help="width and height of the view in px")
    view.add_argument("--out", required=True, help="the image file to write, with the panorama's extension")
    view.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _add_hdr_command(commands) -> None:
    """``hdr``: HDR lighting from an equirect image (``products.hdr``)."""
    hdr = commands.add_parser(
        "hdr", help="turn a 360° equirect image into HDR lighting: panorama.exr, panorama_sky.exr, lighting.json",
        description="Linearise a 2:1 equirectangular panorama, find its light sources (compact near-saturated regions "
        "on the sphere) and expand them into HDR emitters: the sun's irradiance on a plane facing it becomes --sun-ratio "
        "times the rest of the sky's. Writes panorama.exr (HDR), panorama_sky.exr (the sky without the emitters) and "
        "lighting.json (the sources: direction, size, colour, radiance, irradiance) into --out (docs/engine.md, "
        "\"HDR lighting\").",
    )
    hdr.add_argument("panorama", help="the equirectangular image: .png (8-bit sRGB) or .exr (linear)")
    hdr.add_argument("--out", required=True, help="output folder for panorama.exr, panorama_sky.exr and lighting.json")
    hdr.add_argument("--overwrite", action="store_true", help="replace existing files of those names in --out")
    add_lighting_arguments(hdr, generation=False)


def _add_metrics_command(commands) -> None:
    """``metrics``: coherence and seams of an image (``analysis.metrics``)."""
    metrics = commands.add_parser(
        "metrics", help="measure an image's coherence (Intra-LPIPS, Intra-Style-L) and wrap seams",
        description="Measure SyncDiffusion's coherence metrics of a finished image: Intra-LPIPS and Intra-Style-L "
        "(mean LPIPS-VGG and Gram-matrix style loss over all pairs of non-overlapping square crops; lower is more "
        "coherent), the wrap seam ratios, and for equirect the same metrics on the four horizon cube faces plus the "
        "seam ratios of the 12 cube-face edges and of the two poles. "
        "Prints JSON on stdout (docs/metrics.md).",
    )
    metrics.add_argument("image", help="the image, .png or .exr (linear; sRGB-encoded before measuring)")
    metrics.add_argument("--layout", required=True, choices=LAYOUTS,
                         help="wide: planar panorama; equirect: 2:1 360° image (seam in x, horizon faces, cube edges, poles); "
                         "tile: wraps in x and y")
    metrics.add_argument("--window-px", type=int, help="crop size in px (default: the height for wide, half the height "
                         "for equirect and tile)")
    metrics.add_argument("--backbone", default="auto", choices=SYNC_LOSS_BACKBONES,
                         help="the loss networks' trunks: auto (ImageNet weights when cached or downloadable, default), "
                         "pretrained (fail without them) or random (numbers comparable only to each other)")
    metrics.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


def add_lighting_arguments(parser, generation: bool) -> None:
    """--exposure, --sun-ratio, --sun-strength, --sun-direction and --half, for ``generate`` and ``hdr``."""
    parser.add_argument("--exposure", type=float, default=0.0, metavar="EV",
                        help="scale the linear image by 2^EV (default 0)")
    parser.add_argument("--sun-ratio", type=float, default=DEFAULT_SUN_RATIO, metavar="R",
                        help=f"the sun's irradiance on a plane facing it over the rest of the sky's, > 0 (default "
                             f"{DEFAULT_SUN_RATIO:g}; clear days are about 3-10)")
    parser.add_argument("--sun-strength", type=float, metavar="S",
                        help="the sun's irradiance in the EXR's units instead (a uniform sky of 1 gives pi); overrides --sun-ratio")
    where = "; the views that see it also get \"the sun\" in their prompt" if generation else ""
    parser.add_argument("--sun-direction", metavar="YAW,PITCH",
                        help="degrees (yaw right of the image centre, pitch above the horizon) where the sun is: the "
                             f"light source found near it, or one placed there with a warning{where}; write "
                             "--sun-direction=-30,20 for a negative yaw")
    parser.add_argument("--half", action="store_true", help="write half-float EXRs instead of float32")


def _cubemap(args: argparse.Namespace) -> int:
    from ..products.cubemap import write_cubemap
    from ..products.files import output_lock

    lock = output_lock(args.out)  # held from the check to the end: a second run into --out is refused

    def work() -> int:
        with lock:
            paths = write_cubemap(args.panorama, args.out, face_size=args.face_size, overwrite=args.overwrite)
        print(f"wrote {', '.join(paths)} into {lock.out}", file=sys.stderr)
        return 0

    return one_sentence_errors(work, lock=lock)


def _view(args: argparse.Namespace) -> int:
    from ..products.files import output_lock
    from ..products.perspective_view import render_view

    lock = output_lock(args.out, "file")

    def work() -> int:
        with lock:
            path = render_view(args.panorama, args.out, yaw=args.yaw, pitch=args.pitch, roll=args.roll,
                               fov=args.fov, size=args.size, overwrite=args.overwrite)
        print(f"wrote {path}", file=sys.stderr)
        return 0

    return one_sentence_errors(work, lock=lock)


def _hdr(args: argparse.Namespace) -> int:
    from ..products.files import output_lock
    from ..products.hdr import write_hdr

    lock = output_lock(args.out)

    def work() -> int:
        with lock:
            paths = write_hdr(args.panorama, args.out, exposure=args.exposure, sun_ratio=args.sun_ratio,
                              sun_strength=args.sun_strength, sun_direction=args.sun_direction, half=args.half,
                              overwrite=args.overwrite)
        print(f"wrote {', '.join(paths)} into {lock.out}", file=sys.stderr)
        return 0

    return one_sentence_errors(work, lock=lock)


def _metrics(args: argparse.Namespace) -> int:
    from ..errors import BadRequest
    from ..analysis.metrics import measure, read_image

    def work() -> int:
        target = os.path.abspath(os.path.expanduser(args.json)) if args.json else None
        if target and not os.path.isdir(os.path.dirname(target)):
            raise BadRequest(f"The folder of --json {target} does not exist.")
        image = read_image(args.image)
        results = measure(image, args.layout, window_px=args.window_px, backbone=args.backbone)  # checks, then loads
        text = json.dumps(results, indent=2)
        if target:
            try:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
            except OSError as error:
                raise BadRequest(f"Could not write --json {target} ({error.strerror or error}).") from None
        print(text)
        return 0

    return one_sentence_errors(work, "Interrupted.")


FILE_COMMANDS = {"cubemap": _cubemap, "view": _view, "hdr": _hdr, "metrics": _metrics}
"""Each file command's name and the function that runs it."""
