#!/usr/bin/env python3
"""Benchmark SyncSphere's MultiDiffusion engine against diffusers' StableDiffusionPanoramaPipeline.

What it measures, on a model with the full Stable Diffusion 2 base architecture and random weights (built
from the configs below and saved once with ``save_pretrained``; nothing is downloaded):

1. Generation on a ``wide`` canvas: our engine (``backend``: check_request, the model loader, then the
   pipeline's stages called one by one: prompt encoding, ``sample_canvas``, ``decode_canvas``) against
   diffusers' ``StableDiffusionPanoramaPipeline`` (the baseline) with the same model folder, DDIM, prompt,
   seed, steps, guidance and view batch, window 64 and stride 8 (what the baseline hard-codes). For each:
   seconds per denoising step, seconds per stage and in total, number of views, UNet calls and UNet rows
   (samples through the UNet), peak memory; then the ratios ours / baseline, and how far apart the two
   final latents are (they should agree: same views, same fusion).
2. Our ``equirect`` layout at the same height. It has more views than ``wide``: on the wrapping axis the
   windows start every stride all the way round, so it costs more per step.
3. Decoding: ``decode_canvas`` (wrap-aware, tiled) on a random latent canvas with the full SD VAE, against
   decoding the same canvas in one piece (``decode_canvas`` with a huge ``max_single``: one ``vae.decode``
   call with circular context).

Every case runs in a fresh subprocess of this script (``--case NAME``), so that its peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated``, elsewhere the process's peak resident set size. Peak figures
include the model weights held in memory. Nothing here asserts on time; it only measures and prints.

Run ``python benchmarks/bench_multidiffusion.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the model is built here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# backend/ lives at the repository root; tests/model_factory.py builds and saves random SD models.
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# ----------------------------------------------------------------------------------- the model
# Stable Diffusion 2 base (stabilityai/stable-diffusion-2-base): the configs of its UNet, VAE and OpenCLIP
# ViT-H text encoder, so the timings are those of the real architecture (the weights are random).
SD2_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=768,
    scaling_factor=0.18215,
)
# model_factory adds bos/eos/pad ids matching its character tokenizer (ids 0 and 1, all < vocab_size).
SD2_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    hidden_act="gelu",
    projection_dim=512,
    vocab_size=49408,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
)
MODEL_CONFIGS = {"unet": SD2_UNET, "vae": SD_VAE, "text_encoder": SD2_TEXT}

WINDOW, STRIDE = 64, 8  # latent pixels; what StableDiffusionPanoramaPipeline hard-codes
GENERATION_CASES = ("ours-wide", "diffusers-wide", "ours-equirect")
DECODE_CASES = ("decode-tiled", "decode-one-piece")
CASE_TITLES = {
    "ours-wide": "ours, wide",
    "diffusers-wide": "diffusers panorama, wide",
    "ours-equirect": "ours, equirect",
    "decode-tiled": "tiled (decode_canvas)",
    "decode-one-piece": "one piece",
}
# Above this many latent pixels the one-piece decode is skipped unless --decode-one-piece: a one-piece
# decode of a 4096x2048 image needs tens of GB. 256x128 latents is a 2048x1024 px image.
ONE_PIECE_DEFAULT_LIMIT = 256 * 128


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (the parent's flags; a case subprocess gets the same ones plus --case/--result)."""
    parser = argparse.ArgumentParser(
        description="Time SyncSphere's MultiDiffusion against diffusers' StableDiffusionPanoramaPipeline, and "
        "the tiled decode against a one-piece decode, on a randomly initialised Stable Diffusion 2 base model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--width", type=int, default=640, help="wide canvas width in px (640 = 80 latents = 3 views)")
    parser.add_argument("--height", type=int, default=512, help="canvas height in px (wide and equirect)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the wide cases")
    parser.add_argument("--equirect-steps", type=int, default=1,
                        help="DDIM steps of the equirect case (it has many more views; compare seconds per step)")
    add_shared_arguments(parser, view_batch=3, prompt="a sunlit alpine valley with a lake, 360 panorama")
    parser.add_argument("--decode-size", default="1024x512", help="WIDTHxHEIGHT in px of the decode benchmark's image")
    parser.add_argument("--decode-layout", default="equirect", choices=("wide", "equirect", "tile"))
    parser.add_argument("--decode-one-piece", action="store_true",
                        help="also decode in one piece when the image is larger than 2048x1024 px (tens of GB at 4096x2048)")
    parser.add_argument("--decode-max-single", type=int, default=None,
                        help="max_single of the tiled decode (default: the engine's, lowered when the canvas would not tile)")
    parser.add_argument("--decode-tile", type=int, default=None, help="tile of the tiled decode (default: the engine's)")
    parser.add_argument("--decode-overlap", type=int, default=None, help="overlap of the tiled decode (default: the engine's)")
    parser.add_argument("--decode-context", type=int, default=None, help="context of both decodes (default: the engine's)")
    parser.add_argument("--cases", default="ours,diffusers,equirect,decode",
                        help="comma-separated subset of: ours, diffusers, equirect, decode")
    args = parser.parse_args(argv)
    try:
        args.decode_width, args.decode_height = (int(side) for side in args.decode_size.lower().split("x"))
    except ValueError:
        parser.error(f"--decode-size must look like 1024x512, not {args.decode_size!r}")
    for name in ("width", "height", "decode_width", "decode_height"):
        if getattr(args, name) % 8:
            parser.error(f"{name.replace('_', ' ')} {getattr(args, name)} px is not a multiple of the VAE factor 8")
    if args.width < WINDOW * 8 or args.height < WINDOW * 8:
        parser.error(f"the canvas must be at least {WINDOW * 8} px (one window) in each direction")
    args.case_list = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = set(args.case_list) - {"ours", "diffusers", "equirect", "decode"}
    if unknown:
        parser.error(f"unknown case(s) in --cases: {', '.join(sorted(unknown))}")
    return args


def add_shared_arguments(parser: argparse.ArgumentParser, view_batch: int, prompt: str) -> None:
    """The flags every benchmark script has: sampling settings, device, dtype, --model-dir, --json, and the
    internal --case/--result with which the parent runs each case in a fresh process."""
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--view-batch", type=int, default=view_batch)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=prompt)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="auto: float16 on GPUs, float32 on the CPU")
    parser.add_argument("--model-dir", default=None,
                        help="folder for the random SD2 model: built there if absent, reused if present "
                        "(default: a temporary folder, deleted at the end)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every number printed to PATH")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)


# ================================================================================ the parent
def main(argv=None) -> None:
    """Build (or reuse) the model, run every case in its own subprocess, print the tables, write --json."""
    args = parse_args(argv)
    if args.case:
        run_case(args)
        return
    run_benchmark(args, argv, planned_cases(args), __file__,
                  lambda results, work_dir: summarise(args, results, work_dir), lambda summary: print_report(args, summary))


def run_benchmark(args, argv, cases: list[str], script: str, summarise_results, print_summary) -> None:
    """The parent of a benchmark script: build (or reuse) the model in --model-dir, run "build" and then each
    of ``cases`` in a fresh subprocess of ``script``, then print ``summarise_results(results, work_dir)``
    with ``print_summary`` and write it to --json. The temporary folder (and model, without --model-dir) is
    deleted at the end, also on Ctrl-C or `timeout`."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    work_dir = tempfile.mkdtemp(prefix="syncsphere-bench-")
    model_dir = os.path.abspath(args.model_dir) if args.model_dir else os.path.join(work_dir, "sd2-base-random")
    forwarded = list(argv if argv is not None else sys.argv[1:])  # each case gets the same flags
    try:
        results = {"build": run_child("build", forwarded, model_dir, work_dir, script)}
        if "failed" in results["build"]:
            raise SystemExit("Building the model failed; see the error above.")
        for case in cases:
            results[case] = run_child(case, forwarded, model_dir, work_dir, script)
        summary = summarise_results(results, work_dir)
        summary["wall_s"]["all"] = time.perf_counter() - started
        print_summary(summary)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            print(f"\nAll numbers written to {args.json}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # the temporary model too, unless --model-dir


def planned_cases(args) -> list[str]:
    """The case subprocesses to run, in order, from --cases (and whether a one-piece decode is sensible)."""
    cases = []
    if "ours" in args.case_list:
        cases.append("ours-wide")
    if "diffusers" in args.case_list:
        cases.append("diffusers-wide")
    if "equirect" in args.case_list:
        cases.append("ours-equirect")
    if "decode" in args.case_list:
        cases.append("decode-tiled")
        if args.decode_one_piece or (args.decode_width // 8) * (args.decode_height // 8) <= ONE_PIECE_DEFAULT_LIMIT:
            cases.append("decode-one-piece")
    return cases


def run_child(case: str, forwarded: list[str], model_dir: str, work_dir: str, script: str = __file__) -> dict:
    """Run ``case`` in a fresh Python process of ``script`` (this benchmark, or another that shares this
    machinery) and return its result dict.

    The child's stderr (its progress lines) goes straight to ours. A child that fails (an exception, or
    killed for memory) gives {"failed": reason} so the other cases still run and print.
    """
    result_path = os.path.join(work_dir, f"{case}.json")
    command = [sys.executable, os.path.abspath(script), *forwarded,
               "--model-dir", model_dir, "--case", case, "--result", result_path]
    print(f"[{case}] starting", file=sys.stderr, flush=True)
    began = time.perf_counter()
    child = subprocess.Popen(command)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:  # we are being interrupted: do not leave the child running
            child.terminate()
            child.wait()
    wall = time.perf_counter() - began
    if code != 0:
        why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "") if code < 0 else f"exit code {code}"
        print(f"[{case}] FAILED: {why}", file=sys.stderr, flush=True)
        return {"failed": why, "wall_s": wall}
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    result["wall_s"] = wall
    print(f"[{case}] done in {wall:.1f} s (process wall time)", file=sys.stderr, flush=True)
    return result


def summarise(args, results: dict, work_dir: str) -> dict:
    """Everything the report prints, as one JSON-serialisable dict: settings, cases, ratios, wall times."""
    build = results["build"]
    summary = {
        "settings": {name: value for name, value in vars(args).items() if name not in ("case", "result")},
        "window": WINDOW,
        "stride": STRIDE,
        "machine": build["machine"],
        "model": build["model"],
        "cases": {name: result for name, result in results.items() if name != "build"},
        "wall_s": {name: result["wall_s"] for name, result in results.items()},
        "ratios": {},
    }
    ours, theirs = results.get("ours-wide", {}), results.get("diffusers-wide", {})
    if ours and theirs and "failed" not in ours and "failed" not in theirs:
        per_step = "later_step_mean_s" if ours["later_step_mean_s"] is not None and theirs["later_step_mean_s"] is not None else "first_step_s"
        summary["ratios"]["ours_over_diffusers"] = {
            "seconds_per_step": ours[per_step] / theirs[per_step],
            "seconds_per_step_from": per_step,
            "denoise_s": ours["denoise_s"] / theirs["denoise_s"],
            "total_s": ours["total_s"] / theirs["total_s"],
            "peak_mib": _ratio(ours["memory"]["peak_mib"], theirs["memory"]["peak_mib"]),
            "process_peak_mib": ours["memory"]["process_peak_mib"] / theirs["memory"]["process_peak_mib"],
            "unet_rows": ours["unet_rows"] / theirs["unet_rows"],
        }
        summary["latents_max_abs_difference"] = _latent_difference(work_dir)
        # Only for widths of 64 + 8k latents are the views the same (diffusers leaves other widths' last
        # columns uncovered; we add an edge-aligned window), and only then should the latents agree.
        summary["same_views"] = ours["views"] == theirs["views"]
    tiled, whole = results.get("decode-tiled", {}), results.get("decode-one-piece", {})
    if tiled and whole and "failed" not in tiled and "failed" not in whole:
        summary["ratios"]["tiled_over_one_piece"] = {
            "decode_s": tiled["decode_s"] / whole["decode_s"],
            "peak_mib": _ratio(tiled["memory"]["peak_mib"], whole["memory"]["peak_mib"]),
            "process_peak_mib": tiled["memory"]["process_peak_mib"] / whole["memory"]["process_peak_mib"],
        }
    return summary


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _latent_difference(work_dir: str) -> float | None:
    """Max |ours - diffusers| over the final wide-canvas latents both children saved (same seed and views)."""
    paths = [os.path.join(work_dir, f"{case}-latents.pt") for case in ("ours-wide", "diffusers-wide")]
    if not all(os.path.exists(path) for path in paths):
        return None
    import torch

    ours, theirs = (torch.load(path) for path in paths)
    if ours.shape != theirs.shape:
        return None
    return float((ours - theirs).abs().max())


# ------------------------------------------------------------------------------------ printing
def print_report(args, summary: dict) -> None:
    """Print the settings and the result tables, compactly."""
    machine, model, cases = summary["machine"], summary["model"], summary["cases"]
    print()
    print(f"Machine: {machine['device_name']} ({machine['device']}, {machine['dtype']}), {machine['cpu_count']} CPU cores, "
          f"torch {machine['torch']} ({machine['torch_threads']} threads), diffusers {machine['diffusers']}, "
          f"transformers {machine['transformers']}")
    print(f"Model: Stable Diffusion 2 base architecture, random weights: UNet {model['unet_params_m']:.0f}M, "
          f"VAE {model['vae_params_m']:.0f}M, text encoder {model['text_encoder_params_m']:.0f}M parameters "
          f"({'reused' if model['reused'] else 'built in ' + format(model['build_s'], '.0f') + ' s'})")
    print(f"Memory: {machine['memory_note']}")

    generation = [name for name in GENERATION_CASES if name in cases]
    if generation:
        print()
        print(f"Generation: prompt {args.prompt!r}, guidance {args.guidance}, view batch {args.view_batch}, "
              f"DDIM, window {WINDOW} stride {STRIDE} (latent px), seed {args.seed}")
        headers = ["case", "canvas px", "latent", "views", "steps", "UNet calls", "UNet rows", "text s",
                   "1st step s", "later s/step", "denoise s", "decode s", "total s", "load s", "peak MiB", "process peak MiB"]
        rows = []
        for name in generation:
            result = cases[name]
            if "failed" in result:
                rows.append([CASE_TITLES[name], "failed: " + result["failed"]] + [""] * (len(headers) - 2))
                continue
            rows.append([
                CASE_TITLES[name], f"{result['width']}x{result['height']}", f"{result['latent_width']}x{result['latent_height']}",
                result["views"], result["steps"], result["unet_calls"], result["unet_rows"], _f(result["text_s"], 2),
                _f(result["first_step_s"]), _f(result["later_step_mean_s"]), _f(result["denoise_s"]),
                _f(result["decode_s"]), _f(result["total_s"]), _f(result["load_s"]),
                _f(result["memory"]["peak_mib"], 0), _f(result["memory"]["process_peak_mib"], 0),
            ])
        print_table(headers, rows)
        print("  total = text + denoise + decode (model loading not included; it is 'load s'). UNet rows = samples through")
        print("  the UNet (views x steps x 2 with classifier-free guidance). 'peak' = highest memory while generating, model")
        print("  weights included; 'process peak' also covers loading.")
        ratio = summary["ratios"].get("ours_over_diffusers")
        if ratio:
            step_kind = "later steps" if ratio["seconds_per_step_from"] == "later_step_mean_s" else "first step"
            print(f"  ours / diffusers: seconds per step {ratio['seconds_per_step']:.3f}x ({step_kind}), "
                  f"denoise {ratio['denoise_s']:.3f}x, total {ratio['total_s']:.3f}x, peak memory "
                  f"{_f(ratio['peak_mib'], 3)}x (process peak {ratio['process_peak_mib']:.3f}x), UNet rows {ratio['unet_rows']:.2f}x")
        if summary.get("latents_max_abs_difference") is not None:
            why = ("same noise, views and fusion" if summary["same_views"] else
                   "different views: diffusers leaves the last columns of this width uncovered, so they need not agree")
            print(f"  final latents, ours vs diffusers: max |difference| = {summary['latents_max_abs_difference']:.3g} ({why})")
        equirect, wide = cases.get("ours-equirect"), cases.get("ours-wide") or cases.get("diffusers-wide")
        if equirect and "failed" not in equirect:
            line = (f"  equirect has {equirect['views']} views at {equirect['width']}x{equirect['height']} px: it wraps in x, so windows "
                    f"start every {STRIDE} latents all the way round ({equirect['latent_width']} / {STRIDE})")
            if wide and "failed" not in wide:
                line += f", where a wide canvas of the same height stops one window before the edge ({wide['views']} views at {wide['width']} px)"
            print(line + ".")
            if equirect["steps"] == 1:
                print("  The equirect case ran 1 step (--equirect-steps): compare its '1st step s' with the wide cases' '1st step s'.")

    if any(name in cases for name in DECODE_CASES):
        tiled = cases.get("decode-tiled", {})
        print()
        print(f"Decode: {args.decode_width}x{args.decode_height} px {args.decode_layout} image "
              f"(latent {args.decode_width // 8}x{args.decode_height // 8}) from a random latent, SD VAE")
        headers = ["variant", "tile/overlap/context/max_single", "tiles", "largest tile (latent, with context)", "decode s", "load s",
                   "peak MiB", "process peak MiB"]
        rows = []
        for name in DECODE_CASES:
            result = cases.get(name)
            if result is None:
                rows.append([CASE_TITLES[name], "skipped: pass --decode-one-piece (needs tens of GB at this size)"] + [""] * (len(headers) - 2))
                continue
            if "failed" in result:
                rows.append([CASE_TITLES[name], "failed: " + result["failed"]] + [""] * (len(headers) - 2))
                continue
            settings = result["settings"]
            rows.append([
                CASE_TITLES[name],
                f"{settings['tile']}/{settings['overlap']}/{settings['context']}/{settings['max_single'] if settings['max_single'] < 10**6 else 'huge'}",
                f"{result['tiles']} ({result['tile_rows']}x{result['tile_cols']})", result["largest_tile"], _f(result["decode_s"]),
                _f(result["load_s"]), _f(result["memory"]["peak_mib"], 0), _f(result["memory"]["process_peak_mib"], 0),
            ])
        print_table(headers, rows)
        if tiled.get("max_single_note"):
            print(f"  {tiled['max_single_note']}")
        print("  'peak' = highest memory while decoding, VAE weights and the latent included; 'process peak' also covers loading.")
        ratio = summary["ratios"].get("tiled_over_one_piece")
        if ratio:
            print(f"  tiled / one piece: time {ratio['decode_s']:.3f}x, peak memory {_f(ratio['peak_mib'], 3)}x "
                  f"(process peak {ratio['process_peak_mib']:.3f}x)")

    print()
    walls = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["wall_s"].items() if name != "all")
    print(f"Wall time: {summary['wall_s']['all']:.0f} s in all ({walls}; each a fresh process: imports and loading included)")


def print_table(headers: list[str], rows: list[list]) -> None:
    """Print rows under headers, columns padded to their widest cell (text left, numbers right)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells if i < len(row)]) for i, header in enumerate(headers)]
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths)).rstrip())
    for row in cells:
        parts = []
        for i, (cell, width) in enumerate(zip(row, widths)):
            parts.append(cell.ljust(width) if i == 0 or not _is_number(cell) else cell.rjust(width))
        print("  ".join(parts).rstrip())


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ================================================================================ the cases
def run_case(args) -> None:
    """Child process: run one case and write its result dict as JSON to --result."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # the baseline pipeline is deprecated, and says so
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import diffusers
    import transformers

    # Quiet loading: no progress bars or notices between our progress lines (errors still show).
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cases = {
        "build": case_build,
        "ours-wide": lambda a: case_ours(a, "wide"),
        "ours-equirect": lambda a: case_ours(a, "equirect"),
        "diffusers-wide": case_diffusers,
        "decode-tiled": lambda a: case_decode(a, one_piece=False),
        "decode-one-piece": lambda a: case_decode(a, one_piece=True),
    }
    result = cases[args.case](args)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)


def case_build(args) -> dict:
    """Build the random SD2-base model into --model-dir with model_factory (or check the one there)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from model_factory import save_random_sd_model

    folder = args.model_dir
    reused = os.path.isfile(os.path.join(folder, "model_index.json"))
    began = time.perf_counter()
    if reused:
        check_model_folder(folder)
    else:
        if os.path.isdir(folder) and os.listdir(folder):
            raise SystemExit(f"{folder} is neither empty nor a model folder; pass another --model-dir.")
        log("build", f"building the SD2-base model with random weights in {folder} (about 5 GB) ...")
        save_random_sd_model(folder, unet_config=SD2_UNET, vae_config=SD_VAE, text_config=SD2_TEXT)
    build_s = time.perf_counter() - began
    # Parameter counts from the configs alone: models built on the meta device allocate nothing.
    with torch.device("meta"):
        counts = {
            "unet": UNet2DConditionModel(**SD2_UNET),
            "vae": AutoencoderKL(**SD_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **SD2_TEXT)),
        }
    model = {f"{name}_params_m": sum(p.numel() for p in module.parameters()) / 1e6 for name, module in counts.items()}
    model.update(folder=folder, reused=reused, build_s=build_s, configs=MODEL_CONFIGS)
    return {"model": model, "machine": machine_info(args)}


def check_model_folder(folder: str) -> None:
    """Refuse a reused --model-dir whose saved configs are not the SD2-base ones above (timings would mislead)."""
    for component, expected in MODEL_CONFIGS.items():
        with open(os.path.join(folder, component, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        for key, value in json.loads(json.dumps(expected)).items():  # tuples -> lists, as saved
            if saved.get(key) != value:
                raise SystemExit(f"{folder}/{component} has {key}={saved.get(key)!r}, not {value!r}: "
                                 "it is not the model this benchmark builds; pass another --model-dir.")


def machine_info(args) -> dict:
    """Device, dtype, versions and how memory is measured, for the report's header."""
    import diffusers
    import torch
    import transformers

    from backend.engine.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        note = "torch.cuda.max_memory_allocated of each case's process (GPU memory, model weights included)"
    else:
        name = _cpu_name()
        note = ("peak resident set size of each case's process (/proc/self/status VmHWM, else ru_maxrss), model "
                "weights and the Python/torch runtime included")
        if device.type == "mps":
            note += "; on mps this misses GPU allocations"
    return {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "device_name": name,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "memory_note": note,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


# ------------------------------------------------------------------------------------ generation
def case_ours(args, layout: str) -> dict:
    """Our engine on a ``layout`` canvas, stage by stage as ``backend.app.job`` runs them (minus writing files)."""
    import torch

    from backend.engine.decode import decode_canvas
    from backend.engine.denoiser import GuidedUNetDenoiser
    from backend.engine.models import ModelCache
    from backend.app.job import check_request
    from backend.engine.generation import initial_noise, make_scheduler
    from backend.request import GenerateRequest
    from backend.engine.sampler import sample_canvas

    width = args.width if layout == "wide" else 2 * args.height  # equirect is 2:1
    steps = args.steps if layout == "wide" else args.equirect_steps
    request = GenerateRequest(
        prompt=args.prompt, layout=layout, width=width, height=args.height, steps=steps, guidance=args.guidance,
        seed=args.seed, window=WINDOW, stride=STRIDE, view_batch=args.view_batch, scheduler="ddim",
        model=args.model_dir, device=args.device, dtype=args.dtype,
        out=os.path.join(os.path.dirname(args.result), "unused-out"),  # required by validation; nothing is written
    )
    checked = check_request(request)  # the CLI's checks: sizes against the model, device, dtype
    memory = PeakMemory(checked.device)
    clock = Clock(checked.device)

    began = clock()
    model = ModelCache().get(checked)
    load_s = clock() - began
    memory.loaded()
    log(args.case, f"model loaded in {load_s:.1f} s")

    # The stages of backend.engine.generation.denoise, called one at a time so each can be timed.
    pipeline, geometry = model.pipeline, model.geometry
    resolved = checked.resolved_for(model)
    request, views = resolved.params, resolved.views
    canvas = views.canvas
    scheduler = make_scheduler(request.scheduler, pipeline.scheduler.config)
    unet = UNetCounter(pipeline.unet)

    began = clock()
    uses_guidance = request.guidance > 1.0
    prompt_embeds, negative_embeds = pipeline.encode_prompt(request.prompt, model.device, 1, uses_guidance, None)
    text_s = clock() - began

    stamps = []

    def report(stage, step, total, preview):
        stamps.append(clock())
        log(args.case, f"step {step}/{total} at {stamps[-1] - denoise_began:.1f} s")

    denoise_began = clock()
    denoiser = GuidedUNetDenoiser(pipeline.unet, prompt_embeds, negative_embeds, request.guidance)
    noise = initial_noise(request.seed, (1, geometry.latent_channels, canvas.height, canvas.width), model.device, model.dtype)
    # As generation.denoise does: a generator for schedulers that take one (DDIM with eta 0 does not use it).
    step_kwargs = {"generator": torch.Generator("cpu").manual_seed(request.seed + 1)}
    latents = sample_canvas(denoiser, scheduler, views, noise, steps=request.steps, view_batch=request.view_batch,
                            step_kwargs=step_kwargs, report=report)
    denoise_s = clock() - denoise_began

    began = clock()
    decode_canvas(pipeline.vae, latents, canvas)[0].permute(1, 2, 0).numpy()  # the image, as run_job makes it
    decode_s = clock() - began
    if layout == "wide":  # for the parent's ours-vs-diffusers check
        torch.save(latents.float().cpu(), os.path.join(os.path.dirname(args.result), f"{args.case}-latents.pt"))
    return generation_result(width, args.height, geometry.vae_scale_factor, len(views), steps, unet, load_s, text_s,
                             denoise_began, stamps, denoise_s, decode_s, memory)


def case_diffusers(args) -> dict:
    """diffusers' StableDiffusionPanoramaPipeline on the wide canvas: the same model folder and settings."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

    from backend.engine.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    memory = PeakMemory(device)
    clock = Clock(device)

    began = clock()
    pipeline = StableDiffusionPanoramaPipeline.from_pretrained(
        args.model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False,
        use_safetensors=True, local_files_only=True,
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    load_s = clock() - began
    memory.loaded()
    log(args.case, f"model loaded in {load_s:.1f} s")
    views = pipeline.get_views(args.height, args.width, window_size=WINDOW, stride=STRIDE)
    unet = UNetCounter(pipeline.unet)

    # Encoded outside the call (and passed in) only so that text encoding is timed apart, as for ours.
    began = clock()
    uses_guidance = args.guidance > 1.0
    prompt_embeds, negative_embeds = pipeline.encode_prompt(args.prompt, device, 1, uses_guidance, None)
    text_s = clock() - began

    stamps, final = [], {}

    def on_step_end(pipe, index, timestep, tensors):
        stamps.append(clock())
        final["latents"] = tensors["latents"]
        log(args.case, f"step {index + 1}/{args.steps} at {stamps[-1] - denoise_began:.1f} s")
        return {}

    denoise_began = clock()
    pipeline(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance, view_batch_size=args.view_batch,
        generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np", callback_on_step_end=on_step_end,
    )
    ended = clock()
    # The pipeline decodes (one vae.decode of the whole canvas) right after the last step's callback.
    denoise_s, decode_s = stamps[-1] - denoise_began, ended - stamps[-1]
    torch.save(final["latents"].float().cpu(), os.path.join(os.path.dirname(args.result), f"{args.case}-latents.pt"))
    return generation_result(args.width, args.height, 8, len(views), args.steps, unet, load_s, text_s,
                             denoise_began, stamps, denoise_s, decode_s, memory)


def generation_result(width, height, factor, views, steps, unet, load_s, text_s, began, stamps, denoise_s, decode_s, memory) -> dict:
    """The numbers of one generation case. ``stamps``: clock readings at the end of each step, from ``began``."""
    durations = [end - start for start, end in zip([began] + stamps[:-1], stamps)]
    later = durations[1:]
    return {
        "width": width, "height": height, "latent_width": width // factor, "latent_height": height // factor,
        "views": views, "steps": steps, "unet_calls": unet.calls, "unet_rows": unet.rows,
        "load_s": load_s, "text_s": text_s, "step_s": durations,
        # The first step carries one-off costs (allocator growth, kernel selection); later steps are the rate.
        "first_step_s": durations[0], "later_step_mean_s": sum(later) / len(later) if later else None,
        "denoise_s": denoise_s, "decode_s": decode_s, "total_s": text_s + denoise_s + decode_s,
        "memory": memory.result(),
    }


# ------------------------------------------------------------------------------------ decoding
def case_decode(args, one_piece: bool) -> dict:
    """decode_canvas on a random latent of --decode-size: tiled (the engine's way) or in one piece."""
    import inspect

    import torch
    from diffusers import AutoencoderKL

    from backend.sphere.canvas import Canvas
    from backend.engine.decode import axis_tiles, decode_canvas
    from backend.engine.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    memory = PeakMemory(device)
    clock = Clock(device)
    began = clock()
    vae = AutoencoderKL.from_pretrained(
        args.model_dir, subfolder="vae", dtype=dtype, use_safetensors=True, local_files_only=True
    ).to(device).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    canvas = Canvas(args.decode_layout, args.decode_height // factor, args.decode_width // factor)
    # Unit Gaussian latent, like the sampler's output in scale; a fixed seed so both variants see the same one.
    latents = torch.randn(1, vae.config.latent_channels, canvas.height, canvas.width,
                          generator=torch.Generator("cpu").manual_seed(args.seed)).to(device, dtype)
    load_s = clock() - began
    memory.loaded()

    settings, note = decode_settings(args, canvas, inspect.signature(decode_canvas).parameters, one_piece)
    rows = axis_tiles(canvas.height, settings["tile"], settings["overlap"], settings["max_single"], canvas.wraps_y)
    cols = axis_tiles(canvas.width, settings["tile"], settings["overlap"], settings["max_single"], canvas.wraps_x)
    tiles = len(rows) * len(cols)
    log(args.case, f"{canvas.width}x{canvas.height} latents in {tiles} tile(s) ({len(rows)}x{len(cols)}), VAE loaded in {load_s:.1f} s")

    # Watch the VAE decoder's calls: one per tile, to report progress and the largest tile it really got.
    largest, done = [0, 0], [0]

    def before_tile(module, inputs):
        height, width = inputs[0].shape[-2:]
        if height * width > largest[0] * largest[1]:
            largest[:] = [height, width]

    def after_tile(module, inputs, output):
        done[0] += 1
        log(args.case, f"tile {done[0]}/{tiles} decoded at {clock() - decode_began:.1f} s")

    vae.decoder.register_forward_pre_hook(before_tile)
    vae.decoder.register_forward_hook(after_tile)
    decode_began = clock()
    decode_canvas(vae, latents, canvas, **settings)
    decode_s = clock() - decode_began
    return {
        "settings": settings, "max_single_note": note, "tiles": tiles, "tile_rows": len(rows), "tile_cols": len(cols),
        "largest_tile": f"{largest[1]}x{largest[0]} ({largest[1] * factor}x{largest[0] * factor} px)",
        "latent_width": canvas.width, "latent_height": canvas.height,
        "load_s": load_s, "decode_s": decode_s, "memory": memory.result(),
    }


def decode_settings(args, canvas, defaults, one_piece: bool) -> tuple[dict, str | None]:
    """tile/overlap/context/max_single for decode_canvas, and a note when max_single had to be lowered.

    The engine's defaults, except: one piece means a max_single larger than any canvas; and when the canvas
    is small enough that the engine would decode it in one piece anyway (no side above max_single), the tiled
    variant lowers max_single just below the longest side so that side is cut into tiles.
    """
    settings = {name: getattr(args, f"decode_{name}") for name in ("tile", "overlap", "context", "max_single")}
    settings = {name: defaults[name].default if value is None else value for name, value in settings.items()}
    note = None
    longest = max(canvas.height, canvas.width)
    if one_piece:
        settings["max_single"] = 10**9
    elif args.decode_max_single is None and longest <= settings["max_single"]:
        note = (f"max_single lowered from the engine's {settings['max_single']} to {longest - 1} latents so that this "
                f"canvas is decoded in tiles (the engine would decode it in one piece).")
        settings["max_single"] = longest - 1
    if not one_piece:
        for side in (canvas.height, canvas.width):
            if settings["max_single"] < side < settings["tile"]:
                raise SystemExit(f"A {side}-latent side cannot be cut into {settings['tile']}-latent tiles; "
                                 "use a bigger --decode-size or a smaller --decode-tile.")
    return settings, note


# ------------------------------------------------------------------------------------ measuring
class Clock:
    """Seconds from perf_counter, after waiting for queued GPU work so the readings are real."""

    def __init__(self, device):
        import torch

        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self._sync()
        return time.perf_counter()


class UNetCounter:
    """Counts the UNet's forward calls and the samples (rows) they carry, with a forward pre-hook."""

    def __init__(self, unet):
        self.calls = self.rows = 0
        unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.rows += sample.shape[0]


class PeakMemory:
    """Peak memory of this process, split at ``loaded()`` into the loading phase and the measured work.

    CUDA: torch.cuda.max_memory_allocated (the weights stay allocated, so the work's peak includes them).
    Elsewhere: the peak resident set size, VmHWM in /proc/self/status, which writing 5 to
    /proc/self/clear_refs resets to the current size, so the work's peak is not hidden by a loading
    transient. We do not use ru_maxrss where VmHWM exists: a child's ru_maxrss starts at its parent's
    peak (Linux carries it over exec), so it would report the parent's memory, not the case's.
    """

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self.load_peak = self.loaded_now = None
        self.can_reset = False
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def loaded(self) -> None:
        """Call once the weights are in memory: remember the loading peak and start measuring the work."""
        import torch

        if self.cuda:
            self.load_peak = torch.cuda.max_memory_allocated(self.device)
            self.loaded_now = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.load_peak, self.loaded_now = _rss_peak(), _rss_now()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.can_reset = True
        except OSError:
            self.can_reset = False  # then the work's peak is unknown; the process peak still is

    def result(self) -> dict:
        """MiB: loaded (right after loading; safetensors weights are mapped and only become resident, and
        counted, as they are first used), load_peak, peak (during the work), process_peak (all of it)."""
        import torch

        mib = 1 / 2**20
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            process_peak = max(peak, self.load_peak)
            rss = _rss_peak()
        else:
            peak = _rss_peak() if self.can_reset else None
            process_peak = max(_rss_peak(), self.load_peak)
            rss = process_peak
        return {
            "kind": "cuda_allocated" if self.cuda else "rss",
            "loaded_mib": self.loaded_now * mib, "load_peak_mib": self.load_peak * mib,
            "peak_mib": None if peak is None else peak * mib, "process_peak_mib": process_peak * mib,
            "rss_process_peak_mib": rss * mib,
        }


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _rss_peak() -> int:
    """Peak resident set size of this process in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KB on Linux
    return peak


def _rss_now() -> int:
    current = _proc_status_bytes("VmRSS")
    return _rss_peak() if current is None else current


def add_canvas_and_case_arguments(parser: argparse.ArgumentParser, cases: tuple, width: int, height: int, steps: int) -> None:
    """The flags of the benchmarks that compare methods on one wide canvas: its size, window, stride and DDIM
    steps, the shared flags (``add_shared_arguments``), and ``--cases``, a subset of ``cases``."""
    parser.add_argument("--width", type=int, default=width, help="wide canvas width in px")
    parser.add_argument("--height", type=int, default=height, help="canvas height in px")
    parser.add_argument("--window", type=int, default=32, help="view size in latents (the GPU run: 64)")
    parser.add_argument("--stride", type=int, default=8, help="view stride in latents")
    parser.add_argument("--steps", type=int, default=steps, help="DDIM steps (the GPU run: 50)")
    add_shared_arguments(parser, view_batch=4, prompt="a sunlit alpine valley with a lake, wide panorama")
    parser.add_argument("--cases", default=",".join(cases), help="comma-separated subset of: " + ", ".join(cases))


def case_list(parser: argparse.ArgumentParser, args: argparse.Namespace, cases: tuple) -> argparse.Namespace:
    """``args.case_list``: the names in ``--cases`` (unknown names are a parser error). Returns ``args``."""
    args.case_list = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = set(args.case_list) - set(cases)
    if unknown:
        parser.error(f"unknown case(s) in --cases: {', '.join(sorted(unknown))}")
    return args


def parse_case_list(parser: argparse.ArgumentParser, args: argparse.Namespace, cases: tuple) -> argparse.Namespace:
    """``case_list``, with "multidiffusion" first since every ratio is to it; checks the canvas size against
    the window. Returns ``args``."""
    case_list(parser, args, cases)
    if "multidiffusion" not in args.case_list:
        args.case_list.insert(0, "multidiffusion")
    if args.width % 8 or args.height % 8 or min(args.width, args.height) < args.window * 8:
        parser.error("width and height must be multiples of 8 px and at least one window")
    return args


def later_mean(seconds: list[float]) -> float:
    """Mean step time without the first step, which carries one-off costs, when there are later ones."""
    later = seconds[1:] or seconds
    return sum(later) / len(later)


def log(case: str, message: str) -> None:
    """A progress line on stderr, tagged with the case."""
    print(f"[{case}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
