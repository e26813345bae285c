"""What the preview while it paints (``--preview-every``, issue 21) costs per denoising step.

Two parts, both printed as tables:

1. **In a job**: the product's own path (``check_request`` + ``run_job``, one model cache, as the worker runs) on the
   same canvas with ``--preview-every 0`` (none), the default and 1 (every step), interleaved over ``--repeats``
   rounds so that a busy machine slows all alike. Seconds per step = the job's ``denoising_s`` / steps (the
   previews are made inside the denoising stage); the ratio is against ``--preview-every 0`` of the same run, and
   metadata.json's "preview" gives the seconds of the previews themselves (projection + PNG), per preview.
   Models: the tests' tiny model with Stable Diffusion 2's 64-latent views (``--tiny-world``: a 2048 x 1024 world at
   its real latent size, so the preview's own cost is the product's) and the development model toy-landscape
   (``--toy``: it paints real content). A tiny UNet makes a step cheap, so these ratios are upper bounds: a real
   SD 2 step costs far more, the preview the same.
2. **One preview at product sizes**, without a model: the canvas latent of a 2048 x 1024 and a 4096 x 2048 Stable
   Diffusion world (128 x 256 and 256 x 512 latents) through the linear projection and the PNG write the job does,
   and through TAESD's architecture (diffusers' ``AutoencoderTiny`` default config, random weights: the timing is
   the real decoder's) cut to 1024 px wide, then the PNG.

    python benchmarks/bench_preview.py                 # both parts on the CPU (a few minutes on 2 cores)
    python benchmarks/bench_preview.py --parts alone   # part 2 only
    python benchmarks/bench_preview.py --device cuda --model PATH --width 2048 --height 1024 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), HERE]

TOY_MODEL = os.path.join(os.path.dirname(REPO), "shared", "models", "toy-landscape")


def parse_args(argv=None) -> argparse.Namespace:
    from backend.request import DEFAULT_PREVIEW_EVERY

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="job,alone", help="job, alone or both (default job,alone)")
    parser.add_argument("--model", help="a model folder for part 1 instead of the built-in cases")
    parser.add_argument("--layout", default="equirect")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--schedule", default="shifted", help="the job's --schedule (default shifted)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three settings (default 2)")
    parser.add_argument("--every", type=int, default=DEFAULT_PREVIEW_EVERY, help="the cadence to compare besides 1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="also write the numbers to this file")
    return parser.parse_args(argv)


def job_case(name: str, model: str, args, out_root: str, models, **request) -> list[dict]:
    """Run the job with --preview-every 0, ``args.every`` and 1, ``args.repeats`` rounds; one row per setting."""
    from backend.app.job import check_request, run_job
    from backend.request import GenerateRequest

    settings = [0, args.every, 1]
    timings = {every: [] for every in settings}
    previews = {every: [] for every in settings}
    base = dict(prompt="a sunlit alpine valley with a lake", model=model, device=args.device, dtype=args.dtype, seed=7,
                steps=args.steps, overwrite=True, **request)
    run_job(check_request(GenerateRequest(**base, out=os.path.join(out_root, "warm-up"), preview_every=0)), models=models)
    for round_number in range(args.repeats):
        for every in settings:
            out = os.path.join(out_root, f"{name}-{every}")
            run_job(check_request(GenerateRequest(**base, out=out, preview_every=every)), models=models)
            with open(os.path.join(out, "metadata.json"), encoding="utf-8") as file:
                metadata = json.load(file)
            timings[every].append(metadata["timings"]["denoising_s"] / args.steps)
            if "preview" in metadata:
                previews[every].append(metadata["preview"]["seconds"] / metadata["preview"]["count"])
            print(f"[{name}] round {round_number + 1}, every {every}: {timings[every][-1]:.3f} s/step", file=sys.stderr)
    plain = statistics.median(timings[0])
    rows = []
    for every in settings:
        per_step = statistics.median(timings[every])
        rows.append({"case": name, "every": every, "s_per_step": per_step, "ratio": per_step / plain,
                     "s_per_preview": statistics.median(previews[every]) if previews[every] else None})
    return rows


def alone_case(label: str, latent_shape: tuple, preview, repeats: int = 5) -> dict:
    """Seconds of one preview (projection, then the PNG written as the job writes it) of a random latent."""
    import torch

    from backend.products.outputs import PreviewFile

    latent = torch.randn(*latent_shape)
    with tempfile.TemporaryDirectory() as folder, PreviewFile(folder) as target:
        image = preview(latent)
        target.write(image)  # warm-up
        project, write = [], []
        for _ in range(repeats):
            began = time.perf_counter()
            image = preview(latent)
            middle = time.perf_counter()
            target.write(image)
            project.append(middle - began)
            write.append(time.perf_counter() - middle)
    return {"case": label, "latent": f"{latent_shape[2]}x{latent_shape[3]}", "png": f"{image.shape[1]}x{image.shape[0]}",
            "project_s": statistics.median(project), "png_s": statistics.median(write),
            "total_s": statistics.median(project) + statistics.median(write)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from backend.engine.models import ModelCache
    from backend.engine.preview import LATENT_RGB_FACTORS, LinearPreview, TinyAutoencoderPreview

    torch.manual_seed(0)
    parts = set(args.parts.split(","))
    results = {"job": [], "alone": []}
    with tempfile.TemporaryDirectory() as root:
        if "job" in parts:
            models = ModelCache()
            if args.model:
                cases = [("model", args.model, dict(layout=args.layout, width=args.width, height=args.height,
                                                    schedule=args.schedule))]
            else:
                from bench_multidiffusion import WINDOW
                from model_factory import TINY_TEXT, TINY_UNET, TINY_VAE, save_random_sd_model

                tiny = os.path.join(root, "tiny-sd2-views")
                save_random_sd_model(tiny, unet_config={**TINY_UNET, "sample_size": WINDOW}, vae_config=TINY_VAE,
                                     text_config=TINY_TEXT)
                cases = [("tiny, world 2048x1024", tiny, dict(layout="equirect", width=2048, height=1024,
                                                              schedule=args.schedule))]
                if os.path.isfile(os.path.join(TOY_MODEL, "model_index.json")):
                    cases.append(("toy, world 512x256", TOY_MODEL, dict(layout="equirect", width=512, height=256,
                                                                         schedule=args.schedule)))
            for name, model, request in cases:
                results["job"] += job_case(name, model, args, os.path.join(root, "out"), models, **request)
        if "alone" in parts:
            from diffusers import AutoencoderTiny

            linear = LinearPreview(*LATENT_RGB_FACTORS["sd"])
            taesd = TinyAutoencoderPreview(AutoencoderTiny().eval().requires_grad_(False), 8)
            for world, shape in (("2048x1024", (1, 4, 128, 256)), ("4096x2048", (1, 4, 256, 512))):
                results["alone"].append(alone_case(f"linear, world {world}", shape, linear))
                results["alone"].append(alone_case(f"TAESD, world {world}", shape, taesd, repeats=2))

    if results["job"]:
        print("\nIn a job (s/step = denoising seconds / steps; ratio against --preview-every 0 of the same run)\n")
        print("| case | --preview-every | s/step | × none | s per preview |")
        print("|---|---:|---:|---:|---:|")
        for row in results["job"]:
            each = "-" if row["s_per_preview"] is None else f"{row['s_per_preview']:.4f}"
            print(f"| {row['case']} | {row['every']} | {row['s_per_step']:.3f} | {row['ratio']:.3f} | {each} |")
    if results["alone"]:
        print("\nOne preview at product sizes (random latent, on the CPU)\n")
        print("| case | latent | PNG | projection s | PNG write s | total s |")
        print("|---|---|---|---:|---:|---:|")
        for row in results["alone"]:
            print(f"| {row['case']} | {row['latent']} | {row['png']} | {row['project_s']:.4f} | {row['png_s']:.4f} | "
                  f"{row['total_s']:.4f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
