"""The command line: ``python -m backend generate | upscale | serve | batch | cubemap | view | hdr | metrics | info``.

Flags map one to one onto ``GenerateRequest`` fields. Bad input gets one sentence on stderr and exit
code 2 before any model loads and before the output folder is created.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

from .. import __version__
from .command_errors import report_failure, sigterm_as_interrupt
from .file_commands import FILE_COMMANDS, add_file_commands, add_lighting_arguments, run_file_command
from .models_cli import add_models_command, run_models_command
from ..request import (
    DEFAULT_MODEL,
    DEFAULT_SAMPLING,
    DEFAULT_SIZES,
    FEW_STEP_SAMPLING,
    DEFAULT_VIEW_SET,
    DTYPES,
    MEMORY_MODES,
    QUANTIZE_MODES,
    FUSIONS,
    SCHEDULES,
    LAYOUTS,
    SCHEDULERS,
    SYNC_LOSS_BACKBONES,
    SYNC_LOSSES,
    SYNC_METHODS,
    SYNCSDE_COMPOSE,
    DEFAULT_SYNCSDE_LAMBDA,
    DEFAULT_PREVIEW_EVERY,
    VIEW_SETS,
    DEFAULT_STRENGTH,
    UPSCALE_FACTORS,
    UPSCALE_PROMPT,
    UPSCALE_STEPS,
    UPSCALE_STRENGTH,
    GenerateRequest,
    check_upscaled_size,
    sampling_defaults,
)
from ..errors import BadRequest


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one sentence and exit 2, like ours
        self.exit(2, f"error: {message[0].upper() + message[1:]}.\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m backend`` with its sub-commands."""
    parser = _Parser(prog="python -m backend", description="SyncSphere's generation engine.")
    parser.add_argument("--version", action="version", version=f"SyncSphere backend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate_command(commands)
    _add_upscale_command(commands)
    _add_serve_command(commands)
    _add_batch_command(commands)
    add_file_commands(commands)
    commands.add_parser("info", help="print the device, dtype and package versions",
                        description="Print the device and dtype --device auto would pick, and package versions, as JSON.")
    add_models_command(commands)
    return parser


def _add_generate_command(commands) -> None:
    """``generate``: every flag of a ``GenerateRequest`` (``request_from_args``)."""
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
    generate.add_argument("--width", type=int, help="image width in px, a multiple of the VAE factor (default: "
                          f"{_default_sizes(0)}; an equirect given only --height is twice as wide)")
    generate.add_argument("--height", type=int, help=f"image height in px (default: {_default_sizes(1)}; an "
                          "equirect given only --width is half as high)")
    generate.add_argument("--steps", type=int, help=f"denoising steps (default {DEFAULT_SAMPLING[0]}; "
                          f"{FEW_STEP_SAMPLING['euler-trailing'][0]} with --scheduler euler-trailing)")
    generate.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (default {DEFAULT_SAMPLING[1]:g}; "
                          f"{FEW_STEP_SAMPLING['euler-trailing'][1]:g} with --scheduler euler-trailing; <= 1 disables it)")
    generate.add_argument("--seed", type=int, help="random seed; omitted, one is picked and recorded in metadata.json")
    generate.add_argument("--window", type=int, help="view size in latent pixels (default: the UNet's sample size, 64 for SD 2 base)")
    generate.add_argument("--stride", type=int, help="distance between views in latent pixels (default: window/8)")
    generate.add_argument("--view-batch", type=int, default=None,
                          help="views per UNet call; lower it to save memory (default: chosen by --memory: on a CUDA GPU "
                          "the largest batch up to 16 whose estimate fits in the free memory, 4 on the CPU and MPS, "
                          "1 with --memory low)")
    generate.add_argument(
        "--scheduler", default="auto",
        help=f"sampler: {', '.join(SCHEDULERS)} or any diffusers scheduler class name (default auto: the model's own "
             "scheduler for few-step models (LCM, trailing-spaced Turbo), DDIM otherwise; euler-trailing: Euler with "
             "trailing timesteps whatever the model's config says, SDXL-Lightning's sampler; euler-trailing-sample: "
             "the same for a UNet predicting the clean sample, Lightning's 1-step)",
    )
    _add_model_arguments(generate)
    generate.add_argument("--out", required=True, help="output folder for panorama.png, panorama.exr and metadata.json (equirect: "
                          "also the cube map face_F.png … face_D.png, cubemap_dice.png, cubemap_horizon.png, and unless "
                          "--no-hdr panorama_sky.exr and lighting.json)")
    generate.add_argument("--overwrite", action="store_true", help="replace existing output files in --out")
    generate.add_argument("--allow-pickle", action="store_true", help="allow pickled checkpoints (.ckpt/.bin/.pt), which can run code when loaded")
    generate.add_argument("--json-progress", action="store_true",
                          help="print the protocol's JSON progress/done/error events on stdout instead of a progress bar")
    generate.add_argument("--preview-every", type=int, default=DEFAULT_PREVIEW_EVERY, metavar="N",
                          help="with --json-progress: a preview PNG of the canvas every N denoising steps and the last, "
                          "named in the progress events (the tiny autoencoder when cached, else a linear latent "
                          f"projection; default {DEFAULT_PREVIEW_EVERY}, 0: none)")
    _add_start_arguments(generate)
    _add_view_arguments(generate)
    _add_sync_arguments(generate)
    _add_mad_arguments(generate)
    lighting = generate.add_argument_group(
        "HDR lighting", "equirect only: panorama.exr becomes an HDR image whose sun lights a scene, with panorama_sky.exr "
        "and lighting.json beside it (docs/engine.md, \"HDR lighting\").")
    lighting.add_argument("--no-hdr", action="store_true",
                          help="write panorama.exr as the plain linearised image, without panorama_sky.exr and lighting.json")
    add_lighting_arguments(lighting, generation=True)


def _add_start_arguments(generate: argparse.ArgumentParser) -> None:
    """--init-image, --strength and --upscale (docs/engine.md, "Start from an image and upscale")."""
    start = generate.add_argument_group("start from an image, upscale",
                                        "img2img from an image, and a second pass at a larger size (issue 18).")
    start.add_argument("--init-image", metavar="FILE",
                       help="start from this .png, .jpg or .exr (tone-mapped by --exposure) instead of noise, resized to "
                            "the canvas (any layout; it wraps as the layout does)")
    start.add_argument("--strength", type=float,
                       help=f"with --init-image: how much of it is re-drawn, in (0, 1]: the last steps × strength of the "
                            f"--steps run (default {DEFAULT_STRENGTH:g}, as diffusers' img2img)")
    start.add_argument("--upscale", type=int, metavar="{" + ",".join(map(str, UPSCALE_FACTORS)) + "}",
                       help=f"then upscale the image 2 or 4 times (at most 8192x4096 px): img2img of the enlarged image "
                            f"at strength {UPSCALE_STRENGTH:g} with the same views and sync, the HDR and cube map made "
                            "from the result")
    photo = generate.add_argument_group("extend a photo into a world",
                                        "equirect only: the photo is kept where its camera saw it and the rest of the "
                                        "sphere is painted around it (docs/engine.md, \"Extend a photo\").")
    photo.add_argument("--photo", metavar="FILE",
                       help="the photo to extend: .png, .jpg or .exr (tone-mapped by --exposure), any size and aspect")
    photo.add_argument("--photo-fov", type=float, metavar="DEG",
                       help="with --photo (required): the horizontal field of view it was taken with, between 1 and 179")
    photo.add_argument("--photo-yaw", type=float, default=0.0, metavar="DEG",
                       help="with --photo: where the camera looked, degrees to the right of the image centre (default 0)")
    photo.add_argument("--photo-pitch", type=float, default=0.0, metavar="DEG",
                       help="with --photo: degrees the camera looked up (negative: down), -90 to 90 (default 0)")


def _add_upscale_command(commands) -> None:
    """``upscale PANORAMA --scale 2|4 --out DIR``: a panorama made larger by img2img (``upscale_request``)."""
    upscale = commands.add_parser(
        "upscale", help="upscale a panorama, 360° world or tile 2 or 4 times, seamlessly",
        description="Enlarge a panorama (ours or any equirect, tile or wide image) 2 or 4 times (at most 8192x4096 px) "
        "and re-draw its detail with the model from a partial noise level (img2img), with the views and sync of "
        "generation, so an equirect stays seamless at ±180° and a tile on its torus; writes the files generate "
        "writes (HDR and cube map from the result) into --out.",
    )
    upscale.add_argument("panorama", metavar="PANORAMA", help="the image: .png, .jpg or .exr (tone-mapped by --exposure)")
    upscale.add_argument("--scale", type=int, required=True, metavar="{" + ",".join(map(str, UPSCALE_FACTORS)) + "}",
                         help="how many times wider and higher")
    upscale.add_argument("--out", required=True, help="output folder (the files of generate)")
    upscale.add_argument("--layout", metavar="{" + ",".join(LAYOUTS) + "}",
                         help="default from the aspect: 2:1 equirect, 1:1 tile, else wide")
    upscale.add_argument("--prompt", help="what the image shows (default: the prompt in the metadata.json beside "
                         f"PANORAMA, else {UPSCALE_PROMPT!r})")
    upscale.add_argument("--negative-prompt", default="", help="what it should not show")
    upscale.add_argument("--strength", type=float, default=UPSCALE_STRENGTH,
                         help=f"how much is re-drawn, in (0, 1] (default {UPSCALE_STRENGTH:g})")
    upscale.add_argument("--steps", type=int, default=UPSCALE_STEPS,
                         help=f"the schedule's steps, of which steps × strength run (default {UPSCALE_STEPS})")
    upscale.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    upscale.add_argument("--seed", type=int, help="random seed (default: one is picked and recorded)")
    upscale.add_argument("--views", metavar="{" + ",".join(VIEW_SETS) + "}", help="equirect only: as generate's")
    upscale.add_argument("--schedule", default="auto", metavar="{" + ",".join(SCHEDULES) + "}", help="as generate's")
    upscale.add_argument("--window", type=int, help="view size in latent pixels, as generate's")
    upscale.add_argument("--stride", type=int, help="distance between views in latent pixels, as generate's")
    _add_model_arguments(upscale)
    upscale.add_argument("--overwrite", action="store_true", help="replace existing output files in --out")
    upscale.add_argument("--allow-pickle", action="store_true", help="allow pickled checkpoints (.ckpt/.bin/.pt)")
    upscale.add_argument("--json-progress", action="store_true", help="protocol JSON events on stdout")
    upscale.add_argument("--preview-every", type=int, default=DEFAULT_PREVIEW_EVERY, metavar="N",
                         help="with --json-progress: a preview PNG every N steps (0: none)")
    lighting = upscale.add_argument_group("HDR lighting", "equirect only, as generate's.")
    lighting.add_argument("--no-hdr", action="store_true", help="write panorama.exr without the sun expanded")
    add_lighting_arguments(lighting, generation=True)


def upscale_request(args: argparse.Namespace) -> GenerateRequest:
    """The GenerateRequest of parsed ``upscale`` flags (not validated yet): PANORAMA as the start image at
    ``--strength``, the canvas ``--scale`` times its size (rounded down to whole latents of 8 px; an equirect
    stays 2:1), the layout from the aspect unless given. Raises BadRequest with one sentence for an unreadable
    image, a scale other than 2 or 4, or a result larger than 8192x4096 px."""
    from ..products.images import read_start_image

    if args.scale not in UPSCALE_FACTORS:
        raise BadRequest(f"--scale must be 2 or 4, not {args.scale}.")
    path = os.path.abspath(os.path.expanduser(args.panorama))
    height, width = read_start_image(path, args.exposure).shape[:2]
    layout = args.layout or ("equirect" if width == 2 * height else "tile" if width == height else "wide")
    check_upscaled_size(width * args.scale, height * args.scale)
    new_height = height * args.scale // 8 * 8
    new_width = 2 * new_height if layout == "equirect" else width * args.scale // 8 * 8
    fields = {name: getattr(args, name) for name in GenerateRequest.__dataclass_fields__ if hasattr(args, name)}
    fields.update(prompt=args.prompt if args.prompt is not None else _prompt_beside(path), layout=layout,
                  width=new_width, height=new_height, init_image=path)
    return GenerateRequest(**fields)


def _prompt_beside(path: str) -> str:
    """The prompt recorded in the metadata.json beside ``path`` (a panorama SyncSphere wrote), else UPSCALE_PROMPT."""
    try:
        with open(os.path.join(os.path.dirname(path), "metadata.json"), encoding="utf-8") as file:
            prompt = json.load(file)["params"]["prompt"]
        return prompt if isinstance(prompt, str) and prompt.strip() else UPSCALE_PROMPT
    except (OSError, ValueError, KeyError, TypeError):
        return UPSCALE_PROMPT


def _default_sizes(axis: int) -> str:
    """The default width (``axis`` 0) or height (1) of every layout, for the help: "2048 wide, 2048 equirect, 512 tile"."""
    return ", ".join(f"{DEFAULT_SIZES[layout][axis]} {layout}" for layout in LAYOUTS)


def _add_model_arguments(generate: argparse.ArgumentParser) -> None:
    """The model, its LoRA, and where and how it runs: --model … --memory."""
    generate.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local diffusers folder or .safetensors file (default {DEFAULT_MODEL})")
    generate.add_argument("--model-config", help="for a single-file checkpoint: a diffusers folder or hub id whose configs describe it "
                          "(default: inferred by diffusers and fetched from the hub cache)")
    generate.add_argument("--lora", help="LoRA weights to fuse into the model: a .safetensors file, a folder or a hub id "
                          "(e.g. latent-consistency/lcm-lora-sdv1-5 with --scheduler lcm --steps 4 --guidance 1)")
    generate.add_argument("--lora-scale", type=float, default=1.0, help="strength of the --lora weights (default 1)")
    generate.add_argument("--unet-file", metavar="FILE", help="a .safetensors file of a whole UNet's weights to use in "
                          "place of the model's (e.g. sdxl_lightning_4step_unet.safetensors on SDXL base, with "
                          "--scheduler euler-trailing)")
    generate.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    generate.add_argument("--dtype", default="auto", metavar="{" + ",".join(DTYPES) + "}",
                          help="auto: float16 on GPUs, float32 on the CPU")
    generate.add_argument("--memory", default="auto", choices=MEMORY_MODES,
                          help="full: everything on the device at once; low: models kept in CPU memory and moved to the "
                          "GPU stage by stage, view batch 1 (MAD off) and a strip-wise VAE decode (the same image with "
                          "less memory); auto (default): full when the device's free memory holds the job, else low")
    generate.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                          help="int8: store the Linear weights of the UNet or transformer and of the text encoders as "
                          "int8 (torchao's weight-only int8; pip install -r requirements-quantize.txt), about half "
                          "their float16 memory, so SD3.5 medium with T5 or SDXL fits an 8 GB card with room; close to "
                          "the unquantised image, not equal (default none)")
    generate.add_argument("--compile", action="store_true",
                          help="opt-in: run the UNet through torch.compile (mode default); the first job with a model is "
                          "slower while it compiles, later jobs in the same worker reuse the compiled UNet; not with "
                          "--mad-steps or --sync syncdiffusion")


def _add_serve_command(commands) -> None:
    """``serve --stdio``: the worker Blender talks to (``server.serve_stdio``); ``serve --ray``: the HTTP API on Ray
    Serve (``serve_ray.serve_ray_command``)."""
    serve = commands.add_parser(
        "serve", help="run the worker Blender talks to (JSON lines on stdin/stdout), or the HTTP API on Ray Serve",
        description="--stdio: run the long-lived worker: protocol requests on stdin, events on stdout "
        "(docs/protocol.md); it never opens a network port. --ray: serve jobs to several artists over HTTP on Ray "
        "Serve, one replica per GPU, every request with the token of --token-file (docs/running.md).",
    )
    transport = serve.add_mutually_exclusive_group(required=True)
    transport.add_argument("--stdio", action="store_true", help="talk over stdin/stdout")
    transport.add_argument("--ray", action="store_true", help="an HTTP API in front of a Ray Serve deployment "
                           "(pip install -r requirements-ray.txt)")
    serve.add_argument("--host", default="127.0.0.1", help="--ray: the address the API listens on (default "
                       "127.0.0.1; another needs --allow-remote)")
    serve.add_argument("--port", type=int, default=8600, help="--ray: the API's port (default 8600)")
    serve.add_argument("--token-file", metavar="FILE", help="--ray: the file holding the bearer token every "
                       "request must send (at least 16 characters)")
    serve.add_argument("--allow-remote", action="store_true", help="--ray: allow a --host that is not loopback "
                       "(put TLS in front: docs/running.md)")
    serve.add_argument("--out", default=os.path.join("~", ".cache", "syncsphere", "serve"), metavar="DIR",
                       help="--ray: the folder the replicas write each job into (DIR/<job id>/; default "
                       "~/.cache/syncsphere/serve); on several machines, one every node sees")
    serve.add_argument("--replicas", type=int, metavar="N", help="--ray: job replicas (default: one per GPU, 1 "
                       "without GPUs)")
    serve.add_argument("--cpu", action="store_true", help="--ray: replicas ask for a CPU instead of a GPU")
    serve.add_argument("--ray-address", metavar="ADDR", help="--ray: an existing Ray cluster (default: a local one)")
    serve.add_argument("--max-jobs", type=int, default=64, metavar="N", help="--ray: jobs queued or running at once; "
                       "more are refused with HTTP 429 (default 64)")


def _add_batch_command(commands) -> None:
    """``batch JOBS.jsonl --out DIR``: many jobs on a Ray cluster (``batch.batch_command``)."""
    batch = commands.add_parser(
        "batch", help="run a file of jobs on a Ray cluster (pip install -r requirements-ray.txt)",
        description="Run one job per line of JOBS.jsonl (a JSON object of the protocol's generate params, with an "
        "optional id) on Ray: a worker per GPU keeps its model loaded, each job's files appear whole in "
        "DIR/<id>/, a re-run skips finished jobs, and a job whose worker dies is retried on another.",
    )
    batch.add_argument("jobs", metavar="JOBS.jsonl", help="one job per line: {\"prompt\": ..., \"steps\": ..., \"id\": ...}")
    batch.add_argument("--out", required=True, metavar="DIR", help="folder that receives one folder per job id")
    batch.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (ray://host:10001 or host:6379); "
                       "default: a local one on 127.0.0.1, stopped at the end")
    batch.add_argument("--workers", type=int, metavar="N", help="workers (Ray actors; default: the cluster's GPUs, "
                       "1 with --cpu)")
    batch.add_argument("--cpu", action="store_true", help="workers ask for a CPU instead of a GPU, and jobs without a "
                       "device run on the CPU (tests, machines without a GPU)")


def _add_view_arguments(generate: argparse.ArgumentParser) -> None:
    """--views, --fusion and the per-direction prompts (docs/engine.md, "View sets" and "Fusion")."""
    views = generate.add_argument_group("views", "Which views a 360° (equirect) job denoises, and how they are fused.")
    views.add_argument("--views", metavar="{" + ",".join(VIEW_SETS) + "}",
                       help=f"equirect only: band: crop windows of the canvas; cube: the six faces; ring: 8 views 45° apart "
                            f"plus the up and down faces (MVDiffusion); band+poles: crop windows within ±60° plus the up and "
                            f"down faces. Default: {DEFAULT_VIEW_SET} where a row of windows fits within ±60° (a "
                            f"{'x'.join(map(str, DEFAULT_SIZES['equirect']))} world with SD 2 base), else band (a 1024x512 "
                            "world), and the job then says so on stderr")
    views.add_argument("--schedule", default="auto", metavar="{" + ",".join(SCHEDULES) + "}",
                       help="which views each step runs: dense: every overlapping window every step (MultiDiffusion); "
                            "shifted: windows that cover the canvas once, moved by an offset from the seed every step "
                            "(SpotDiffusion), several times faster; auto (default): the measured default of the layout, "
                            "dense with --stride, --fusion, --sync syncsde or --views ring/cube")
    views.add_argument("--fusion", default="auto", metavar="{" + ",".join(FUSIONS) + "}",
                       help="what is averaged where views overlap: noisy: each view's x_t-1 (MultiDiffusion); clean: "
                            "Tweedie's x0, each view keeping its own noise; auto (default): noisy for crop windows only, "
                            "clean when projected views take part")
    views.add_argument("--prompt-up", default="", help="equirect only: added to the prompt of views looking up (the sky)")
    views.add_argument("--prompt-down", default="", help="equirect only: added to the prompt of views looking down (the ground)")


def _add_mad_arguments(generate: argparse.ArgumentParser) -> None:
    """--mad-steps and --mad-blocks (docs/engine.md, "MAD")."""
    mad = generate.add_argument_group("merged attention (MAD)", "Attention on the merged canvas for the first steps.")
    mad.add_argument("--mad-steps", type=int, default=0, metavar="TAU",
                     help="merge the views' attention on the canvas for the first TAU steps (Quattrini et al.; the "
                          "paper uses 15 of 50; on SD3 its joint attention, with one prompt for all views); every view "
                          "then runs in one batch; default 0: off")
    mad.add_argument("--mad-blocks", default="down,mid,up",
                     help="blocks whose attention is merged: a comma-separated list of down, mid, up (default all); on a "
                          "UNet its down, mid and up blocks, on a transformer (SD3) the first, middle and last third of "
                          "its blocks")


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
    fields = {name: getattr(args, name) for name in names if hasattr(args, name)}
    # --steps and --guidance not given: the scheduler's (4 steps without guidance for euler-trailing).
    for name, default in zip(("steps", "guidance"), sampling_defaults(fields.get("scheduler", "auto"))):
        if fields.get(name) is None:
            fields[name] = default
    return GenerateRequest(**fields)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, model not found or --out in use, 3 out of
    memory, 130 interrupted (Ctrl-C or SIGTERM), 1 anything else)."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "serve" and args.ray:
        from .command_errors import one_sentence_errors
        from .serve_ray import serve_ray_command

        with sigterm_as_interrupt():
            return one_sentence_errors(lambda: serve_ray_command(args))
    if args.command == "serve":
        from .server import serve_stdio

        return serve_stdio()
    if args.command == "models":
        return run_models_command(args)
    if args.command == "batch":
        from .batch import batch_command
        from .command_errors import one_sentence_errors

        with sigterm_as_interrupt():
            return one_sentence_errors(lambda: batch_command(args), "Interrupted; the finished jobs' folders are "
                                       "complete, the rest were not written (a re-run does them).")
    with sigterm_as_interrupt():  # a killed job or file command cleans up as Ctrl-C does
        if args.command in FILE_COMMANDS:
            return run_file_command(args)
        return _generate(args, upscale_request if args.command == "upscale" else request_from_args)


def _generate(args: argparse.Namespace, make_request=None) -> int:
    """Run one job (``generate``, or ``upscale``), its request made from ``args`` by ``make_request`` (default
    ``request_from_args``); every run with --json-progress ends with a done or an error event."""
    from .. import protocol
    from ..products.files import output_lock

    json_progress = args.json_progress
    events = sys.stdout
    # Held from the check to the end: a second run into --out is refused before anything loads.
    lock = output_lock(args.out)
    try:
        # With --json-progress stdout carries protocol lines only: whatever a library prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr if json_progress else sys.stdout), lock:
            from .job import check_request, run_job

            request = (make_request or request_from_args)(args)
            if not json_progress and request.preview_every > 0:  # a bar shows no pictures: no PNGs to write
                request = dataclasses.replace(request, preview_every=0)
            checked = check_request(request)
            if checked.resolved is not None:  # a hub model or folder: its views are decided before it loads
                _print_view_set_note(checked.params, checked.resolved.params, checked.resolved.geometry.vae_scale_factor)
            with _ProgressPrinter(events if json_progress else None) as report:
                outputs = run_job(checked, report)
            if checked.resolved is None:  # a single-file checkpoint: decided once loaded, as metadata.json records
                with open(outputs["metadata"], encoding="utf-8") as file:
                    metadata = json.load(file)
                _print_view_set_note(checked.params, GenerateRequest(**metadata["params"]),
                                     metadata["model"]["vae_scale_factor"])
    except (Exception, KeyboardInterrupt) as error:
        kind, sentence, code = report_failure(error, lock=lock)
        if json_progress:
            protocol.write_event(events, protocol.error_event(None, kind, sentence))
        return code
    if json_progress:
        protocol.write_event(events, protocol.done_event(None, outputs))
    else:
        cube_map = " and the cube map (face_*.png, cubemap_dice.png, cubemap_horizon.png)" if "faces" in outputs else ""
        lighting = f", {outputs['exr_sky']}, {outputs['lighting']}" if "lighting" in outputs else ""
        print(f"wrote {outputs['png']}, {outputs['exr']}{lighting} and {outputs['metadata']}{cube_map}", file=sys.stderr)
    return 0


def _print_view_set_note(asked: GenerateRequest, chosen: GenerateRequest, vae_scale_factor: int) -> None:
    """Say on stderr when an equirect job without --views runs band instead of the default (the canvas is too low
    for band+poles): ``resolve.default_view_set_note``."""
    from ..engine.resolve import default_view_set_note

    note = default_view_set_note(asked, chosen, vae_scale_factor)
    if note:
        print(f"note: {note}", file=sys.stderr)


class _ProgressPrinter:
    """The CLI's step report: a tqdm bar on stderr, or protocol progress events on ``events``."""

    def __init__(self, events):
        from ..protocol import StepTimer

        self.events = events
        self.bar = None
        self.timer = StepTimer()  # the events' seconds_per_step, as the stdio worker sends them

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close_bar()

    def __call__(self, stage, step, total, preview):
        if self.events is not None:
            from ..protocol import progress_event, write_event

            write_event(self.events, progress_event(None, stage, step, total, preview,
                                                    seconds_per_step=self.timer.seconds_per_step(stage, step)))
        elif stage in ("downloading", "denoising"):
            if self.bar is None or self.bar.desc != stage:
                from tqdm import tqdm

                self._close_bar()
                bytes_ = stage == "downloading"  # downloading counts bytes, denoising steps
                self.bar = tqdm(total=total, desc=stage, unit="B" if bytes_ else "step", unit_scale=bytes_, file=sys.stderr)
            self.bar.update(step - self.bar.n)
        else:
            self._close_bar()  # finished: drawn once, complete, before the next stage's line
            print(f"{stage}…", file=sys.stderr)
        return False

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
