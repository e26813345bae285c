"""The command line: ``python -m backend generate | serve | cubemap | view | hdr | metrics | info``.

Flags map one to one onto ``GenerateRequest`` fields. Bad input gets one sentence on stderr and exit
code 2 before any model loads and before the output folder is created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .. import __version__
from ..errors import SyncSphereError
from .command_errors import one_sentence_errors
from .models_cli import add_models_command, run_models_command
from ..request import (
    DEFAULT_MODEL,
    DEFAULT_VIEW_SET,
    DTYPES,
    MEMORY_MODES,
    FUSIONS,
    LAYOUTS,
    SCHEDULERS,
    SYNC_LOSS_BACKBONES,
    SYNC_LOSSES,
    SYNC_METHODS,
    SYNCSDE_COMPOSE,
    DEFAULT_SYNCSDE_LAMBDA,
    DEFAULT_SUN_RATIO,
    VIEW_SETS,
    GenerateRequest,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one sentence and exit 2, like ours
        self.exit(2, f"error: {message[0].upper() + message[1:]}.\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m backend`` with its sub-commands."""
    parser = _Parser(prog="python -m backend", description="SyncSphere's generation engine.")
    parser.add_argument("--version", action="version", version=f"SyncSphere backend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser(
        "generate",
        help="generate a panorama, 360° equirect or tileable image",
        description="Generate a wide panorama, a 360° equirectangular world or a seamless tile with "
        "MultiDiffusion, and write panorama.png, panorama.exr and metadata.json into --out.",
    )
    generate.add_argument("--prompt", required=True, help="what the image shows")
    generate.add_argument("--negative-prompt", default="", help="what it should not show")
    generate.add_argument(
        "--layout", default="equirect", metavar="{" + ",".join(LAYOUTS) + "}",
        help="wide: a planar panorama; equirect: a 2:1 360° image that wraps in longitude (default); "
        "tile: an image that tiles seamlessly in both directions",
    )
    generate.add_argument("--width", type=int, help="image width in px, a multiple of the VAE factor "
                          "(default: 2048 wide, 1024 equirect, 512 tile)")
    generate.add_argument("--height", type=int, help="image height in px (default: 512; equirect: width/2)")
    generate.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5; <= 1 disables it)")
    generate.add_argument("--seed", type=int, help="random seed; omitted, one is picked and recorded in metadata.json")
    generate.add_argument("--window", type=int, help="view size in latent pixels (default: the UNet's sample size, 64 for SD 2 base)")
    generate.add_argument("--stride", type=int, help="distance between views in latent pixels (default: window/8)")
    generate.add_argument("--view-batch", type=int, default=4, help="views per UNet batch; lower it to save memory (default 4)")
    generate.add_argument(
        "--scheduler", default="auto",
        help=f"sampler: {', '.join(SCHEDULERS)} or any diffusers scheduler class name (default auto: the model's own "
             "scheduler for few-step models (LCM, trailing-spaced Turbo), DDIM otherwise)",
    )
    generate.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local diffusers folder or .safetensors file (default {DEFAULT_MODEL})")
    generate.add_argument("--model-config", help="for a single-file checkpoint: a diffusers folder or hub id whose configs describe it "
                          "(default: inferred by diffusers and fetched from the hub cache)")
    generate.add_argument("--lora", help="LoRA weights to fuse into the model: a .safetensors file, a folder or a hub id "
                          "(e.g. latent-consistency/lcm-lora-sdv1-5 with --scheduler lcm --steps 4 --guidance 1)")
    generate.add_argument("--lora-scale", type=float, default=1.0, help="strength of the --lora weights (default 1)")
    generate.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    generate.add_argument("--dtype", default="auto", metavar="{" + ",".join(DTYPES) + "}",
                          help="auto: float16 on GPUs, float32 on the CPU")
    generate.add_argument("--memory", default="auto", choices=MEMORY_MODES,
                          help="full: everything on the device at once; low: models kept in CPU memory and moved to the "
                          "GPU stage by stage, view batch 1 (MAD off) and a strip-wise VAE decode (the same image with "
                          "less memory); auto (default): full when the device's free memory holds the job, else low")
    generate.add_argument("--out", required=True, help="output folder for panorama.png, panorama.exr and metadata.json (equirect: "
                          "also the cube map face_F.png … face_D.png, cubemap_dice.png, cubemap_horizon.png, and unless "
                          "--no-hdr panorama_sky.exr and lighting.json)")
    generate.add_argument("--overwrite", action="store_true", help="replace existing output files in --out")
    generate.add_argument("--allow-pickle", action="store_true", help="allow pickled checkpoints (.ckpt/.bin/.pt), which can run code when loaded")
    generate.add_argument("--json-progress", action="store_true",
                          help="print the protocol's JSON progress/done/error events on stdout instead of a progress bar")
    _add_view_arguments(generate)
    _add_sync_arguments(generate)
    _add_mad_arguments(generate)
    lighting = generate.add_argument_group(
        "HDR lighting", "equirect only: panorama.exr becomes an HDR image whose sun lights a scene, with panorama_sky.exr "
        "and lighting.json beside it (docs/engine.md, \"HDR lighting\").")
    lighting.add_argument("--no-hdr", action="store_true",
                          help="write panorama.exr as the plain linearised image, without panorama_sky.exr and lighting.json")
    _add_lighting_arguments(lighting, generation=True)

    serve = commands.add_parser(
        "serve", help="run the worker Blender talks to (JSON lines on stdin/stdout)",
        description="Run the long-lived worker: protocol requests on stdin, events on stdout (docs/protocol.md). "
        "It never opens a network port.",
    )
    serve.add_argument("--stdio", action="store_true", required=True, help="talk over stdin/stdout (the only transport)")

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
    _add_lighting_arguments(hdr, generation=False)

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

    commands.add_parser("info", help="print the device, dtype and package versions",
                        description="Print the device and dtype --device auto would pick, and package versions, as JSON.")
    add_models_command(commands)
    return parser


def _add_view_arguments(generate: argparse.ArgumentParser) -> None:
    """--views, --fusion and the per-direction prompts (docs/engine.md, "View sets" and "Fusion")."""
    views = generate.add_argument_group("views", "Which views a 360° (equirect) job denoises, and how they are fused.")
    views.add_argument("--views", metavar="{" + ",".join(VIEW_SETS) + "}",
                       help=f"equirect only: band: crop windows of the canvas; cube: the six faces; ring: 8 views 45° apart "
                            f"plus the up and down faces (MVDiffusion); band+poles: crop windows within ±60° plus the up and "
                            f"down faces (default {DEFAULT_VIEW_SET})")
    views.add_argument("--fusion", default="auto", metavar="{" + ",".join(FUSIONS) + "}",
                       help="what is averaged where views overlap: noisy: each view's x_t-1 (MultiDiffusion); clean: "
                            "Tweedie's x0, each view keeping its own noise; auto (default): noisy for crop windows only, "
                            "clean when projected views take part")
    views.add_argument("--prompt-up", default="", help="equirect only: added to the prompt of views looking up (the sky)")
    views.add_argument("--prompt-down", default="", help="equirect only: added to the prompt of views looking down (the ground)")


def _add_lighting_arguments(parser, generation: bool) -> None:
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


def _add_mad_arguments(generate: argparse.ArgumentParser) -> None:
    """--mad-steps and --mad-blocks (docs/engine.md, "MAD")."""
    mad = generate.add_argument_group("merged attention (MAD)", "Attention on the merged canvas for the first steps.")
    mad.add_argument("--mad-steps", type=int, default=0, metavar="TAU",
                     help="merge the views' attention on the canvas for the first TAU steps (Quattrini et al.; the "
                          "paper uses 15 of 50); every view then runs in one batch; default 0: off")
    mad.add_argument("--mad-blocks", default="down,mid,up",
                     help="UNet blocks whose attention is merged: a comma-separated list of down, mid, up (default all)")


def _add_sync_arguments(generate: argparse.ArgumentParser) -> None:
    """--sync and SyncDiffusion's options (docs/engine.md, "SyncDiffusion")."""
    sync = generate.add_argument_group("synchronisation", "How the overlapping views are made one coherent image.")
    sync.add_argument("--sync", default="multidiffusion", metavar="{" + ",".join(SYNC_METHODS) + "}",
                      help="multidiffusion: average the views (default); syncdiffusion: also pull every view towards "
                      "an anchor view with a perceptual-loss gradient (Lee et al. 2023): more coherent, slower; syncsde: "
                      "each view keeps its own state and is pulled towards its neighbours on their overlap (Lee et al. 2025)")
    sync.add_argument("--sync-weight", type=float, help="SyncDiffusion's gradient weight w (default 20; 0.1 with --sync-loss style)")
    sync.add_argument("--sync-decay", type=float, default=0.95, help="w is multiplied by this every step (default 0.95)")
    sync.add_argument("--sync-steps", type=int, help="guide only the first K denoising steps (default: all)")
    sync.add_argument("--sync-every", type=int, default=1, help="guide every F-th step (default 1: every step)")
    sync.add_argument("--sync-anchor", default="center",
                      help="the view the others are pulled towards: center (default; on equirect the view facing "
                      "longitude 0) or a view index")
    sync.add_argument("--sync-loss", default="lpips-vgg", metavar="{" + ",".join(SYNC_LOSSES) + "}",
                      help="perceptual loss: lpips-vgg (default, the paper's), lpips-alex, or style (Gram matrices)")
    sync.add_argument("--sync-loss-backbone", default="auto", metavar="{" + ",".join(SYNC_LOSS_BACKBONES) + "}",
                      help="the loss network's trunk: auto (ImageNet weights when cached or downloadable, default), "
                      "pretrained (fail without them) or random")
    sync.add_argument("--sync-loss-size", type=int, help="fast path: compute the loss on images resized to N px")
    sync.add_argument("--sync-decoder", default="vae",
                      help="fast path: decoder for the guidance only: vae (default, the model's own), taesd "
                      "(madebyollin/taesd), or a hub id or folder of a diffusers AutoencoderTiny")
    sync.add_argument("--sync-reuse-eps", action="store_true",
                      help="fast path: step with the prediction from the gradient pass instead of predicting again")
    sync.add_argument("--sync-checkpointing", action="store_true",
                      help="gradient checkpointing in the gradient pass: less memory, more time")
    sync.add_argument("--syncsde-lambda", type=float, default=DEFAULT_SYNCSDE_LAMBDA,
                      help=f"SyncSDE's strength lambda (default {DEFAULT_SYNCSDE_LAMBDA:g}, the paper's wide-image value; 0: "
                           "independent views)")
    sync.add_argument("--syncsde-compose", default="paper", metavar="{" + ",".join(SYNCSDE_COMPOSE) + "}",
                      help="paper: later views on top in chain order, as the paper composes; average: average the "
                           "overlaps (default paper)")
    sync.add_argument("--syncsde-open-chain", action="store_true",
                      help="do not close SyncSDE's chain around the wrap (the published code's open chain)")


def request_from_args(args: argparse.Namespace) -> GenerateRequest:
    """The GenerateRequest named by parsed ``generate`` flags (not validated yet)."""
    names = GenerateRequest.__dataclass_fields__
    return GenerateRequest(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or model not found, 3 out of memory,
    130 interrupted, 1 anything else)."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "serve":
        from .server import serve_stdio

        return serve_stdio()
    if args.command == "cubemap":
        return _cubemap(args)
    if args.command == "view":
        return _view(args)
    if args.command == "hdr":
        return _hdr(args)
    if args.command == "metrics":
        return _metrics(args)
    if args.command == "models":
        return run_models_command(args)
    return _generate(args)


def _cubemap(args: argparse.Namespace) -> int:
    from ..products.cubemap import write_cubemap

    def work() -> int:
        paths = write_cubemap(args.panorama, args.out, face_size=args.face_size, overwrite=args.overwrite)
        print(f"wrote {', '.join(paths)} into {os.path.abspath(os.path.expanduser(args.out))}", file=sys.stderr)
        return 0

    return one_sentence_errors(work, "Interrupted; nothing was written.")


def _view(args: argparse.Namespace) -> int:
    from ..products.perspective_view import render_view

    def work() -> int:
        path = render_view(args.panorama, args.out, yaw=args.yaw, pitch=args.pitch, roll=args.roll, fov=args.fov,
                           size=args.size, overwrite=args.overwrite)
        print(f"wrote {path}", file=sys.stderr)
        return 0

    return one_sentence_errors(work, "Interrupted; nothing was written.")


def _hdr(args: argparse.Namespace) -> int:
    from ..products.hdr import write_hdr

    def work() -> int:
        paths = write_hdr(args.panorama, args.out, exposure=args.exposure, sun_ratio=args.sun_ratio,
                          sun_strength=args.sun_strength, sun_direction=args.sun_direction, half=args.half,
                          overwrite=args.overwrite)
        print(f"wrote {', '.join(paths)} into {os.path.abspath(os.path.expanduser(args.out))}", file=sys.stderr)
        return 0

    return one_sentence_errors(work, "Interrupted; nothing was written.")


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


def _generate(args: argparse.Namespace) -> int:
    from .. import protocol

    json_progress = args.json_progress
    events = sys.stdout
    try:
        # With --json-progress stdout carries protocol lines only: whatever a library prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr if json_progress else sys.stdout):
            from .job import check_request, run_job

            checked = check_request(request_from_args(args))
            with _ProgressPrinter(events if json_progress else None) as report:
                outputs = run_job(checked, report)
    except SyncSphereError as error:
        if json_progress:
            protocol.write_event(events, protocol.error_event(None, error.kind, str(error)))
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: Interrupted; nothing was written.", file=sys.stderr)
        return 130
    if json_progress:
        protocol.write_event(events, protocol.done_event(None, outputs))
    else:
        cube_map = " and the cube map (face_*.png, cubemap_dice.png, cubemap_horizon.png)" if "faces" in outputs else ""
        lighting = f", {outputs['exr_sky']}, {outputs['lighting']}" if "lighting" in outputs else ""
        print(f"wrote {outputs['png']}, {outputs['exr']}{lighting} and {outputs['metadata']}{cube_map}", file=sys.stderr)
    return 0


class _ProgressPrinter:
    """The CLI's step report: a tqdm bar on stderr, or protocol progress events on ``events``."""

    def __init__(self, events):
        self.events = events
        self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def __call__(self, stage, step, total, preview):
        if self.events is not None:
            from ..protocol import progress_event, write_event

            write_event(self.events, progress_event(None, stage, step, total))
        elif stage in ("downloading", "denoising"):
            if self.bar is None or self.bar.desc != stage:
                from tqdm import tqdm

                if self.bar is not None:
                    self.bar.close()
                bytes_ = stage == "downloading"  # downloading counts bytes, denoising steps
                self.bar = tqdm(total=total, desc=stage, unit="B" if bytes_ else "step", unit_scale=bytes_, file=sys.stderr)
            self.bar.update(step - self.bar.n)
        else:
            print(f"{stage}…", file=sys.stderr)
        return False


def _info() -> int:
    from .job import package_versions
    from ..engine.models import resolve_device, resolve_dtype

    device = resolve_device("auto")
    info = {
        "device": str(device),
        "dtype": str(resolve_dtype("auto", device)).replace("torch.", ""),
        "versions": package_versions(),
    }
    print(json.dumps(info, indent=2))
    return 0
