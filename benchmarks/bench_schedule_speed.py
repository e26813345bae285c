#!/usr/bin/env python3
"""Is the shifted schedule's denoising time its views' share of the dense schedule's? (issue 17's CPU target)

On a model with the full Stable Diffusion 2 base architecture and random weights in float32 (built by
``bench_multidiffusion.py``'s ``case_build``; nothing is downloaded), one process runs the product's denoising
stage (``check_request``, the model cache, ``backend.engine.generation.denoise``: text encoding, the noise and
the loop) on one ``wide`` canvas with ``--schedule dense`` and ``--schedule shifted``, alternating (dense first
in odd rounds, shifted first in even ones, so that a drift in the machine's speed touches both), ``--repeats``
rounds. A one-view, one-step job first pages the memory-mapped weights in, so no timed run pays for it.

Printed per schedule: views per step (mean over the steps), UNet rows, denoising seconds of each round and their
mean, seconds per UNet row; then ``shifted_s / (views ratio x dense_s)``, where the views ratio is shifted's
mean views per step over dense's. Cost proportional to views gives 1; the issue's target is within 10 %.

    python benchmarks/bench_schedule_speed.py --model-dir /tmp/sd2-base-random [--steps 3] [--repeats 2] [--threads 2]

Timings on a shared CPU vary; rounds are alternated so that both schedules see the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the model is built here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), HERE]

from bench_multidiffusion import case_build, log  # noqa: E402

SCHEDULES = ("dense", "shifted")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", help="folder for the random SD2-base model (float32, about 5 GB): built there "
                        "if absent, reused if present (default: a temporary folder, deleted at the end)")
    parser.add_argument("--width", type=int, default=1024, help="wide canvas width in px")
    parser.add_argument("--height", type=int, default=512, help="canvas height in px")
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps of each run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (dense, shifted)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (two UNet rows a view)")
    parser.add_argument("--view-batch", type=int, default=4, help="views per UNet call (the CPU's fixed batch)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a sunlit alpine valley with a lake, wide panorama")
    parser.add_argument("--json", help="also write every number to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Build (or reuse) the model, run the rounds, print the table."""
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-schedule-speed-") as work_dir:
        model_dir = os.path.abspath(args.model_dir) if args.model_dir else os.path.join(work_dir, "sd2-base-random")
        built = case_build(argparse.Namespace(model_dir=model_dir, device="cpu", dtype="float32"))
        runs = measure(args, model_dir, work_dir)
    summary = summarise(args, runs, built["machine"], time.perf_counter() - began)
    print_report(summary)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


def measure(args, model_dir: str, work_dir: str) -> list[dict]:
    """Every timed run, in the order run: {"schedule", "round", "seconds", "views_per_step", "unet_rows"}."""
    from backend.app.job import check_request
    from backend.engine.generation import denoise
    from backend.engine.models import ModelCache
    from backend.request import GenerateRequest

    cache = ModelCache()

    def run(schedule: str, **fields) -> dict:
        request = GenerateRequest(**{
            "prompt": args.prompt, "layout": "wide", "width": args.width, "height": args.height, "steps": args.steps,
            "guidance": args.guidance, "seed": args.seed, "scheduler": "ddim", "schedule": schedule,
            "view_batch": args.view_batch, "model": model_dir, "device": "cpu", "dtype": "float32",
            "out": os.path.join(work_dir, "unused-out"), **fields})
        checked = check_request(request)
        model = cache.get(checked)
        _, _, details = denoise(checked.resolved_for(model), model, lambda *event: None)
        return {"schedule": schedule, "seconds": details["seconds"], "views_per_step": details["views_per_step"]["mean"],
                "unet_rows": details["unet_rows"]}

    log("warm-up", "one view, one step: pages the weights in")
    run("dense", width=args.height, steps=1)
    runs = []
    for number in range(args.repeats):
        order = SCHEDULES if number % 2 == 0 else SCHEDULES[::-1]
        for schedule in order:
            result = {**run(schedule), "round": number + 1}
            log(schedule, f"round {number + 1}: {result['seconds']:.1f} s, {result['views_per_step']:g} views per step, "
                          f"{result['unet_rows']} UNet rows")
            runs.append(result)
    return runs


def summarise(args, runs: list[dict], machine: dict, wall_s: float) -> dict:
    """Per schedule: its views per step, UNet rows, seconds per round and their mean, seconds per UNet row; the
    ratio ``shifted_s / (views ratio x dense_s)``."""
    schedules = {}
    for schedule in SCHEDULES:
        mine = [run for run in runs if run["schedule"] == schedule]
        mean = statistics.mean(run["seconds"] for run in mine)
        schedules[schedule] = {"views_per_step": mine[0]["views_per_step"], "unet_rows": mine[0]["unet_rows"],
                               "seconds": [run["seconds"] for run in mine], "mean_s": mean,
                               "s_per_unet_row": mean / mine[0]["unet_rows"]}
    dense, shifted = schedules["dense"], schedules["shifted"]
    views_ratio = shifted["views_per_step"] / dense["views_per_step"]
    return {"settings": {key: value for key, value in vars(args).items() if key != "json"}, "machine": machine,
            "schedules": schedules, "views_ratio": views_ratio, "time_ratio": shifted["mean_s"] / dense["mean_s"],
            "target_ratio": shifted["mean_s"] / (views_ratio * dense["mean_s"]), "runs": runs, "wall_s": wall_s}


def print_report(summary: dict) -> None:
    """The settings, one row per schedule, then the ratio the issue targets."""
    settings, machine = summary["settings"], summary["machine"]
    print()
    print(f"Machine: {machine['device_name']} ({machine['device']}, {machine['dtype']}, {settings['threads']} torch "
          f"threads), torch {machine['torch']}, diffusers {machine['diffusers']}")
    print(f"SD2-base architecture, random weights; wide {settings['width']}x{settings['height']} px, {settings['steps']} "
          f"DDIM steps, guidance {settings['guidance']}, view batch {settings['view_batch']}, {settings['repeats']} rounds")
    print(f"{'schedule':<10}{'views/step':>11}{'UNet rows':>11}{'denoise s (each round)':>28}{'mean s':>9}{'s/row':>8}")
    for name, row in summary["schedules"].items():
        rounds = ", ".join(f"{seconds:.1f}" for seconds in row["seconds"])
        print(f"{name:<10}{row['views_per_step']:>11.2f}{row['unet_rows']:>11}{rounds:>28}{row['mean_s']:>9.1f}"
              f"{row['s_per_unet_row']:>8.2f}")
    print(f"views ratio shifted/dense {summary['views_ratio']:.3f}; time ratio {summary['time_ratio']:.3f}; "
          f"shifted_s / (views ratio x dense_s) = {summary['target_ratio']:.3f} (target: within 10 % of 1)")
    print(f"Wall time {summary['wall_s']:.0f} s (model build and warm-up included).")


if __name__ == "__main__":
    main()
