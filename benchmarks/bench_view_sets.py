"""Seam, pole and noise statistics for every view set and fusion rule (issue #4's measurements).

Runs the engine (``backend.app.job.run_job``, files written to a temporary folder) on a tiny random Stable
Diffusion model built with ``tests/model_factory.py`` (UNet sample size 32, VAE factor 8), for each view
set (band, cube, ring, band+poles) and fusion rule (noisy, clean), over several seeds, and measures the
output with ``backend.analysis.metrics``: the wrap-seam ratio at longitude ±180°, the largest ratio over the 12
cube-face edges, and the pole ratios of the up and down faces (docs/metrics.md; about 1 means no
discontinuity). It also measures what a bilinear read does to noise: the standard deviation of unit
Gaussian canvas noise read into each view set's views (noisy fusion reads x_t that way every step),
against 1 for the noise a view keeps as its own (clean fusion). Random weights make the images noise, so
these are statistics of the geometry and the fusion, not of image quality. CPU only; a few minutes.

    python benchmarks/bench_view_sets.py [--seeds 3] [--steps 10] [--width 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]  # backend/, and tests/model_factory.py
os.environ["HF_HUB_OFFLINE"] = "1"

VIEW_SETS = ("band", "cube", "ring", "band+poles")
FUSIONS = ("noisy", "clean")


def read_noise_std(view_set: str, height: int, width: int, window: int, stride: int) -> float:
    """Std of unit Gaussian noise on a height x width latent canvas read into ``view_set``'s projected views
    (all views when it has none): the noise level a noisy-latent read hands the UNet."""
    import torch

    from backend.sphere.canvas import Canvas
    from backend.sphere.view_sets import canvas_views

    views = canvas_views(Canvas("equirect", height, width), view_set, window, stride)
    noise = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(0))
    read = views.read(noise)[len(views.crops):] if views.projected else views.read(noise)
    return float(read.std())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per case (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--width", type=int, default=1024, help="panorama width in px; height = width / 2 (default 1024)")
    parser.add_argument("--view-sets", default=",".join(VIEW_SETS), help="comma-separated view sets (default: all four)")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from backend.engine.models import ModelCache
    from backend.app.job import check_request, run_job
    from backend.analysis.metrics import cube_edge_ratios, pole_ratios, seam_ratio
    from backend.request import GenerateRequest
    from model_factory import TINY_UNET, save_random_sd_model

    results = []
    with tempfile.TemporaryDirectory() as folder:
        model = save_random_sd_model(os.path.join(folder, "tiny"))
        cache = ModelCache()
        window = TINY_UNET["sample_size"]
        latent_height = args.width // 16
        print(f"tiny random model, window {window} latents, {args.width}x{args.width // 2} px, {args.steps} DDIM steps, "
              f"seeds 1..{args.seeds}")
        print(f"{'view set':<11}{'fusion':<7}{'views':>6}{'s/run':>7}{'seam ±180':>11}{'cube edge max':>15}"
              f"{'pole U':>8}{'pole D':>8}{'worst':>7}")
        for view_set in args.view_sets.split(","):
            for fusion in FUSIONS:
                rows = []
                for seed in range(1, args.seeds + 1):
                    request = GenerateRequest(prompt="a canyon under a blue sky", layout="equirect", width=args.width,
                                              steps=args.steps, seed=seed, views=view_set, fusion=fusion, model=model,
                                              device="cpu", out=os.path.join(folder, f"{view_set}-{fusion}-{seed}"))
                    began = time.perf_counter()
                    outputs = run_job(check_request(request), models=cache)
                    seconds = time.perf_counter() - began
                    image = np.asarray(Image.open(outputs["png"]))
                    poles = pole_ratios(image)
                    with open(outputs["metadata"]) as f:
                        views = json.load(f)["views"]
                    rows.append({"seed": seed, "seconds": seconds, "views": views, "seam": seam_ratio(image, 1),
                                 "cube_edge_max": max(cube_edge_ratios(image).values()), "pole_up": poles["U"],
                                 "pole_down": poles["D"]})
                means = {key: statistics.mean(row[key] for row in rows) for key in ("seconds", "seam", "cube_edge_max", "pole_up", "pole_down")}
                worst = max(max(row[key] for key in ("seam", "cube_edge_max", "pole_up", "pole_down")) for row in rows)
                results.append({"view_set": view_set, "fusion": fusion, "runs": rows, "mean": means, "worst": worst})
                print(f"{view_set:<11}{fusion:<7}{rows[0]['views']:>6}{means['seconds']:>7.1f}{means['seam']:>11.2f}"
                      f"{means['cube_edge_max']:>15.2f}{means['pole_up']:>8.2f}{means['pole_down']:>8.2f}{worst:>7.2f}", flush=True)
        print("(means over seeds; worst: the largest of the four ratios over all seeds; 1.2 is the issue's bound)")
        noise = {view_set: read_noise_std(view_set, latent_height, 2 * latent_height, window, window // 8) for view_set in args.view_sets.split(",")}
        print("std of unit canvas noise read into the views (projected views only where the set has them): "
              + ", ".join(f"{name} {value:.3f}" for name, value in noise.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": results, "read_noise_std": noise, "steps": args.steps, "width": args.width}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
