#!/usr/bin/env python3
"""Upscaling 2K -> 4K -> 8K against generating 4K directly: UNet rows, seconds and peak memory (issue 18).

On a model with the full Stable Diffusion 2 base architecture and random weights (built by
``bench_multidiffusion.py``'s machinery; nothing is downloaded), equirect, at reduced steps (``--steps``, 10 by
default; the upscaling passes run ``int(steps * strength)`` of them at ``--strength`` 0.3). A whole 8K job is
thousands of views per step, hours on a CPU, so each kind of work is measured once in its own subprocess and
the stages are counted by the engine's own pieces:

| case | what is measured |
|---|---|
| unet | ``--probe-views`` views of 64x64 latents through the engine's denoiser (classifier-free guidance): seconds per view; and every stage's views per step from ``resolve_request`` (the views the job runs) |
| encode, decode | ``decode.encode_canvas`` / ``decode_canvas`` of a 768x768 px tile canvas: one tile of 112x112 latents with its context, the largest tile the tiled VAE runs at 4K and 8K (``largest_decode_tile``): seconds and peak memory of one tile |

Each stage's time is then its UNet rows x seconds per view plus its VAE tiles x seconds per tile (projected);
its memory is the weights (resident, as the unet case measures them) plus the largest measured work (activations
over the loaded weights: the decoder tile's; tiles at 8K are no larger than at 4K) plus the canvas's own arrays
(``memory.HOST_BYTES_PER_IMAGE_PIXEL`` per pixel). The GPU memory of an 8K job is
projected with the planner's own estimate (``memory.estimate_full_bytes``, float16, view batch 1).

    nice python benchmarks/bench_upscale.py --model-dir /tmp/sd2-random      # CPU: about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the model is built here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), HERE]

from bench_multidiffusion import (  # noqa: E402
    Clock,
    PeakMemory,
    add_shared_arguments,
    case_build,
    case_list,
    log,
    print_table,
    run_benchmark,
)

CASES = ("unet", "encode", "decode")
STAGES = (  # (name, width px, start: None (noise) or the stage whose image it enlarges)
    ("2K generate", 2048, None),
    ("4K upscale", 4096, "2K generate"),
    ("8K upscale", 8192, "4K upscale"),
    ("4K direct", 4096, None),
)
TILE_CANVAS = 96  # latents: a tile canvas of 96 is one piece with 8 latents of context each side, 112 in all


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (the parent's flags; each case subprocess gets the same ones plus --case/--result)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of each stage's schedule")
    parser.add_argument("--strength", type=float, default=0.3, help="the upscaling passes' strength")
    parser.add_argument("--probe-views", type=int, default=2, help="views pushed through the UNet by the unet case")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    add_shared_arguments(parser, view_batch=2, prompt="a sunlit alpine valley with a lake, 360 panorama")
    return case_list(parser, parser.parse_args(argv), CASES)


def main(argv=None) -> None:
    """Build (or reuse) the model, run each case in its own subprocess, print the table, write --json."""
    args = parse_args(argv)
    if args.case:
        import warnings

        warnings.filterwarnings("ignore")
        result = case_build(args) if args.case == "build" else CASE_FUNCTIONS[args.case](args)
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return
    run_benchmark(args, argv, args.case_list, __file__, lambda results, work_dir: summarise(args, results), print_report)


def _request(args, width: int, start: bool, out: str):
    from backend.request import GenerateRequest

    return GenerateRequest(prompt=args.prompt, layout="equirect", width=width, height=width // 2, steps=args.steps,
                           seed=args.seed, view_batch=args.view_batch, guidance=args.guidance, model=args.model_dir,
                           device=args.device, dtype=args.dtype, memory="low", out=out,
                           strength=args.strength if start else None)


def case_unet(args) -> dict:
    """Seconds per view through the denoiser, and each stage's views per step, steps run and VAE tiles."""
    import dataclasses

    import torch

    from backend.app.job import check_request
    from backend.engine.decode import DECODE_MAX_SINGLE, DECODE_OVERLAP, DECODE_TILE, axis_tiles
    from backend.engine.denoiser import GuidedUNetDenoiser
    from backend.engine.memory import estimate_full_bytes
    from backend.engine.models import ModelCache
    from backend.engine.sampler import first_step

    out = os.path.join(os.path.dirname(args.result), "unused-out")
    stages = {}
    for name, width, start in STAGES:
        request = _request(args, width, False, out)
        checked = check_request(request)
        resolved = checked.resolved
        run = args.steps - (first_step(args.steps, args.strength) if start else 0)
        per_step = resolved.views_per_step()[args.steps - run:]
        latent_height, latent_width = request.height // 8, request.width // 8
        tiles = len(axis_tiles(latent_height, DECODE_TILE, DECODE_OVERLAP, DECODE_MAX_SINGLE, False)) * len(
            axis_tiles(latent_width, DECODE_TILE, DECODE_OVERLAP, DECODE_MAX_SINGLE, True))
        gpu = estimate_full_bytes(dataclasses.replace(resolved.params, view_batch=1), torch.float16,
                                  resolved.unet_config, _vae_config(args.model_dir), view_count=1)
        stages[name] = {"width": width, "height": width // 2, "start": start, "views_per_step": per_step[0],
                        "steps_run": run, "unet_rows": sum(per_step) * (2 if args.guidance > 1 else 1),
                        "views": sum(per_step), "tiles": tiles, "gpu_activation_bytes_fp16": gpu}
        log("unet", f"{name}: {per_step[0]} views/step x {run} steps, {tiles} VAE tiles")
    checked = check_request(_request(args, 2048, False, out))
    device, dtype = checked.device, checked.dtype
    memory, clock = PeakMemory(device), Clock(device)
    model = ModelCache().get(checked)
    pipeline = model.pipeline
    embeds, negative = pipeline.encode_prompt([args.prompt], device, 1, True, None)
    denoiser = GuidedUNetDenoiser(pipeline.unet, embeds, negative, args.guidance)
    noise = torch.randn(args.probe_views, 4, 64, 64, generator=torch.Generator("cpu").manual_seed(args.seed)).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    denoiser(noise[:1, :, :8, :8], timestep)  # warm up: the weights become resident
    memory.loaded()
    began = clock()
    for first in range(0, args.probe_views, args.view_batch):
        denoiser(noise[first : first + args.view_batch], timestep)
    seconds = clock() - began
    result = {"stages": stages, "per_view_s": seconds / args.probe_views, "memory": memory.result()}
    log("unet", f"{args.probe_views} views in {seconds:.1f} s; memory {result['memory']}")
    return result


def _vae_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "vae", "config.json"), encoding="utf-8") as f:
        return json.load(f)


def case_vae(args, encode: bool) -> dict:
    """One tile of the tiled, wrap-aware VAE (encode or decode) of the largest size 4K and 8K run."""
    import torch

    from backend.app.job import check_request
    from backend.engine.decode import decode_canvas, encode_canvas
    from backend.engine.memory import StagePlacement
    from backend.engine.models import ModelCache
    from backend.sphere.canvas import Canvas

    checked = check_request(_request(args, 2048, False, os.path.join(os.path.dirname(args.result), "unused-out")))
    device = checked.device
    memory, clock = PeakMemory(device), Clock(device)
    model = ModelCache().get(checked)
    vae = model.pipeline.vae
    StagePlacement(model.pipeline, device, offload=False).enter("decode")
    canvas = Canvas("tile", TILE_CANVAS, TILE_CANVAS)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    if encode:
        image = torch.rand(1, 3, 8 * TILE_CANVAS, 8 * TILE_CANVAS, generator=generator)
        vae.encode(image[:, :, :64, :64].to(device, vae.dtype))  # warm up
        memory.loaded()
        began = clock()
        encode_canvas(vae, image, canvas)
    else:
        latents = torch.randn(1, 4, TILE_CANVAS, TILE_CANVAS, generator=generator).to(device, vae.dtype)
        vae.decode(latents[:, :, :8, :8])  # warm up
        memory.loaded()
        began = clock()
        decode_canvas(vae, latents, canvas)
    seconds = clock() - began
    result = {"tile_s": seconds, "memory": memory.result()}
    log(args.case, f"one {TILE_CANVAS + 16}x{TILE_CANVAS + 16}-latent tile in {seconds:.1f} s; memory {result['memory']}")
    return result


CASE_FUNCTIONS = {"unet": case_unet, "encode": lambda args: case_vae(args, True), "decode": lambda args: case_vae(args, False)}


def summarise(args, results: dict) -> dict:
    """Each stage's rows, projected seconds and peak memory, and the chain against 4K direct."""
    from backend.engine.memory import HOST_BYTES_PER_IMAGE_PIXEL

    unet, encode, decode = results.get("unet", {}), results.get("encode", {}), results.get("decode", {})
    summary = {"machine": results["build"].get("machine"), "model": results["build"].get("model"), "steps": args.steps,
               "strength": args.strength, "wall_s": {}, "stages": {}, "cases": results}
    if "stages" not in unet:
        return summary
    # A job holds every weight (the unet case's loaded figure, with the runtime), the largest of the stages' work
    # (activations: each case's peak over what it had loaded) and the image's arrays.
    def work(case: dict) -> float:
        memory = case.get("memory", {})
        return (memory.get("peak_mib") or 0) - (memory.get("loaded_mib") or 0)

    weights = unet.get("memory", {}).get("loaded_mib") or 0
    largest_work = max(work(case) for case in (unet, encode, decode))
    for name, stage in unet["stages"].items():
        unet_s = stage["views"] * unet["per_view_s"]
        vae_tiles = stage["tiles"] * (2 if stage["start"] else 1)
        vae_s = stage["tiles"] * (decode.get("tile_s", 0) + (encode.get("tile_s", 0) if stage["start"] else 0))
        canvas_mib = stage["width"] * stage["height"] * HOST_BYTES_PER_IMAGE_PIXEL / 2**20
        summary["stages"][name] = {**stage, "unet_s": unet_s, "vae_tiles": vae_tiles, "vae_s": vae_s,
                                   "total_s": unet_s + vae_s, "peak_mib": weights + largest_work + canvas_mib}
    stages = summary["stages"]
    chain_4k = stages["2K generate"]["total_s"] + stages["4K upscale"]["total_s"]
    summary["chain_4k_over_direct"] = chain_4k / stages["4K direct"]["total_s"]
    summary["chain_4k_rows_over_direct"] = (stages["2K generate"]["unet_rows"] + stages["4K upscale"]["unet_rows"]) / stages["4K direct"]["unet_rows"]
    return summary


def print_report(summary: dict) -> None:
    """The table of stages, and the chain against 4K direct."""
    print()
    print(f"SD2-base architecture, random weights; {summary['steps']} DDIM steps, upscaling at strength "
          f"{summary['strength']}; seconds projected from the measured per-view and per-tile costs")
    headers = ["stage", "px", "views/step", "steps run", "UNet rows", "UNet s", "VAE tiles", "VAE s", "total s",
               "job peak MiB (CPU)", "GPU activations fp16 MiB"]
    rows = [[name, f"{s['width']}x{s['height']}", s["views_per_step"], s["steps_run"], s["unet_rows"], f"{s['unet_s']:.0f}",
             s["vae_tiles"], f"{s['vae_s']:.0f}", f"{s['total_s']:.0f}", f"{s['peak_mib']:.0f}",
             f"{s['gpu_activation_bytes_fp16'] / 2**20:.0f}"] for name, s in summary["stages"].items()]
    print_table(headers, rows)
    if "chain_4k_over_direct" in summary:
        print(f"\n2K generate + 4K upscale over 4K direct: {summary['chain_4k_rows_over_direct']:.3f}x the UNet rows, "
              f"{summary['chain_4k_over_direct']:.3f}x the seconds")
    cases = summary["cases"]
    for name in ("unet", "encode", "decode"):
        if "memory" in cases.get(name, {}):
            print(f"{name}: measured peak {cases[name]['memory'].get('peak_mib') or 0:.0f} MiB over the loaded weights "
                  f"(process {cases[name]['memory']['process_peak_mib']:.0f} MiB); "
                  + (f"{cases[name]['per_view_s']:.2f} s per view" if name == "unet" else f"{cases[name]['tile_s']:.1f} s per tile"))


if __name__ == "__main__":
    main()
