#!/usr/bin/env python3
"""Benchmark MAD and SyncSDE against MultiDiffusion, and a 4-step LCM panorama against 50-step DDIM.

On a model with the full Stable Diffusion 2 base architecture and random weights (built by
``bench_multidiffusion.py``'s machinery; nothing is downloaded), one ``wide`` canvas, one seed, each case
runs the engine's denoising stage (``backend.engine.generation.denoise``, the product's code path, from the same request
fields as ``python -m backend generate``) in a fresh subprocess, so its peak memory is its own. Cases:

| case | what |
|---|---|
| multidiffusion | the baseline: DDIM, ``--steps`` steps |
| mad | ``--mad-steps`` = every step, all blocks: the cost of a merged-attention step |
| syncsde | ``--sync syncsde`` (lambda 5, closed chain, the paper's composition) |
| lcm | ``--scheduler lcm`` for 4 steps with ``--guidance 1``: one UNet row per view and step, as a guidance-distilled LCM (a ``time_cond_proj_dim`` UNet) runs; random weights, so it times the schedule, not an LCM's images |

Ratios are of the denoising stage. The MAD paper reports 44.3 s against 41.8 s (1.06x) with merged
attention on the first 15 of 50 steps; ``mad 15/50 x`` projects this run's merged-step and plain-step
seconds to that schedule. ``lcm vs ddim-50``: the LCM case's 4 steps against MultiDiffusion's mean step
time times 50 (DDIM with classifier-free guidance, two UNet rows per view and step).

    python benchmarks/bench_methods.py                      # CPU defaults (a few minutes)
    python benchmarks/bench_methods.py --device cuda --width 2048 --height 512 --window 64 --steps 10 --view-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the models are built here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), HERE]

from bench_multidiffusion import (  # noqa: E402
    Clock,
    PeakMemory,
    add_canvas_and_case_arguments,
    case_build,
    later_mean,
    log,
    parse_case_list,
    run_benchmark,
)

CASES = ("multidiffusion", "mad", "syncsde", "lcm")
LCM_STEPS = 4
MAD_PAPER = {"steps": 15, "of": 50, "ratio": 44.3 / 41.8}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (the parent's flags; each case subprocess gets the same ones plus --case/--result)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_canvas_and_case_arguments(parser, CASES, width=512, height=256, steps=3)
    return parse_case_list(parser, parser.parse_args(argv), CASES)


def main(argv=None) -> None:
    """Build (or reuse) the model, run each case in its own subprocess, print the table, write --json."""
    args = parse_args(argv)
    if args.case:
        run_case(args)
        return
    run_benchmark(args, argv, args.case_list, __file__, lambda results, work_dir: summarise(args, results), print_report)


def case_settings(args, case: str) -> dict:
    """The request fields of ``case`` (the CLI flags' names)."""
    return {"multidiffusion": {}, "mad": {"mad_steps": args.steps}, "syncsde": {"sync": "syncsde"},
            "lcm": {"scheduler": "lcm", "steps": LCM_STEPS, "guidance": 1.0}}[case]


def run_case(args) -> None:
    """Child process: run one case and write its result dict as JSON to --result."""
    import warnings

    warnings.filterwarnings("ignore")
    if args.case == "build":
        result = case_build(args)
    else:
        result = case_denoise(args)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)


def case_denoise(args) -> dict:
    """One case: the engine's denoising stage with the case's settings; seconds per step and peak memory."""
    from backend.engine.models import ModelCache
    from backend.app.job import check_request
    from backend.engine.generation import denoise
    from backend.request import GenerateRequest

    settings = {"steps": args.steps, "guidance": args.guidance, **case_settings(args, args.case)}
    request = GenerateRequest(
        prompt=args.prompt, layout="wide", width=args.width, height=args.height, seed=args.seed, window=args.window,
        stride=args.stride, view_batch=args.view_batch, model=args.model_dir, device=args.device, dtype=args.dtype,
        out=os.path.join(os.path.dirname(args.result), "unused-out"), **settings,
    )
    checked = check_request(request)
    memory, clock = PeakMemory(checked.device), Clock(checked.device)
    model = ModelCache().get(checked)
    memory.loaded()
    stamps = []

    def report(stage, step, total, preview):
        stamps.append(clock())
        log(args.case, f"step {step}/{total} at {stamps[-1] - began:.1f} s")

    began = clock()
    _, _, details = denoise(checked.resolved_for(model), model, report)
    seconds = clock() - began
    return {"views": details["views"], "scheduler": details["scheduler"], "steps": request.steps, "settings": settings,
            "denoise_s": seconds, "step_s": [b - a for a, b in zip([began] + stamps, stamps)], "memory": memory.result()}


def summarise(args, results: dict) -> dict:
    """Every printed number: per case its seconds, step seconds, peak memory and the ratios to MultiDiffusion."""
    rows = {case: results[case] for case in args.case_list}
    base = rows["multidiffusion"]
    if "failed" not in base:
        base_step = later_mean(base["step_s"])
        for case, row in rows.items():
            if "failed" in row:
                continue
            row["mean_step_s"] = later_mean(row["step_s"])
            row["step_ratio"] = row["mean_step_s"] / base_step
            peak, base_peak = row["memory"]["peak_mib"], base["memory"]["peak_mib"]
            row["peak_ratio"] = None if peak is None or base_peak is None else peak / base_peak
        if "failed" not in rows.get("mad", {"failed": ""}):
            merged = rows["mad"]["mean_step_s"]
            rows["mad"]["paper_schedule_ratio"] = (MAD_PAPER["steps"] * merged + (MAD_PAPER["of"] - MAD_PAPER["steps"]) * base_step) / (
                MAD_PAPER["of"] * base_step)
        if "failed" not in rows.get("lcm", {"failed": ""}):
            rows["lcm"]["vs_ddim_50"] = rows["lcm"]["denoise_s"] / (50 * base_step)
    return {"settings": {k: v for k, v in vars(args).items() if k not in ("case", "result")},
            "machine": results["build"]["machine"], "cases": rows,
            "wall_s": {name: result["wall_s"] for name, result in results.items()}}


def print_report(summary: dict) -> None:
    """The settings, then one row per case."""
    settings, machine, cases = summary["settings"], summary["machine"], summary["cases"]
    print()
    print(f"Machine: {machine['device_name']} ({machine['device']}, {machine['dtype']}), torch {machine['torch']}, "
          f"diffusers {machine['diffusers']}")
    first = next(row for row in cases.values() if "failed" not in row)
    print(f"SD2-base architecture, random weights; wide {settings['width']}x{settings['height']} px, window "
          f"{settings['window']} stride {settings['stride']} latents: {first['views']} views; view batch {settings['view_batch']}")
    print(f"Memory: {machine['memory_note']}")
    print(f"{'case':<16}{'steps':>6}{'scheduler':>16}{'denoise s':>11}{'s/step':>9}{'step x':>8}{'peak MiB':>10}{'peak x':>8}  projected")
    for case, row in cases.items():
        if "failed" in row:
            print(f"{case:<16}FAILED: {row['failed']}")
            continue
        projected = ""
        if "paper_schedule_ratio" in row:
            projected = f"merged on 15 of 50 steps: {row['paper_schedule_ratio']:.3f}x (paper: {MAD_PAPER['ratio']:.2f}x)"
        if "vs_ddim_50" in row:
            projected = f"4 LCM steps / 50 DDIM steps: {row['vs_ddim_50']:.3f}x ({1 / row['vs_ddim_50']:.1f}x faster)"
        peak = "-" if row["memory"]["peak_mib"] is None else f"{row['memory']['peak_mib']:.0f}"
        ratio = "-" if row.get("peak_ratio") is None else f"{row['peak_ratio']:.2f}"
        print(f"{case:<16}{row['steps']:>6}{row['scheduler']:>16}{row['denoise_s']:>11.1f}{row['mean_step_s']:>9.2f}"
              f"{row['step_ratio']:>8.2f}{peak:>10}{ratio:>8}  {projected}")
    print("s/step: mean step seconds without the first step; step x: ratio to multidiffusion's.")


if __name__ == "__main__":
    main()
