#!/usr/bin/env python3
"""Peak memory and time of ``--memory full`` against ``--memory low`` for a 2048x1024 equirect job.

On a model with the full Stable Diffusion 2 base architecture and random weights (built by
``bench_multidiffusion.py``'s machinery; nothing is downloaded). Each case runs in a fresh subprocess so its
peak memory is its own, and goes through the engine's own pieces with the plan ``backend.engine.memory.plan_memory``
makes for the mode (view batch, offload, strip decode):

| case | what |
|---|---|
| full-denoise, low-denoise | the text stage (prompt encoding), then ``--probe-views`` views of the job's view set through the engine's denoiser (classifier-free guidance) at one timestep, ``view_batch`` views per UNet call |
| full-decode, low-decode | the decoding stage of the job: ``decode_canvas`` and ``decode_pole_caps`` of a random 128x256 latent, one ``vae.decode`` per tile (full) or strip by strip (low) |

A whole job at 2048x1024 is 130 views x 50 steps, hours on a CPU, so the denoising stage is probed with a
few views and the report projects the job from the seconds per view. Memory: on CUDA the peak allocated
(weights on the device included: low keeps only the stage's model there), elsewhere the peak resident set
size of the process and the part of it the stage added ("work": activations, measured after a small warm-up
call has made the stage's weights resident; on the CPU every weight stays in memory whatever the mode). The two decodes are compared pixel by pixel (the issue's bound: 2/255).

    python benchmarks/bench_memory.py                       # CPU: about 15 minutes on 2 cores
    python benchmarks/bench_memory.py --device cuda --probe-views 32
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

CASES = ("full-denoise", "low-denoise", "full-decode", "low-decode")
JOB_STEPS = 50  # the default --steps, for the projection


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (the parent's flags; each case subprocess gets the same ones plus --case/--result)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=2048, help="equirect width in px (height: width / 2)")
    parser.add_argument("--probe-views", type=int, default=8, help="views pushed through the UNet by the denoise cases")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    add_shared_arguments(parser, view_batch=4, prompt="a sunlit alpine valley with a lake, 360 panorama")
    return case_list(parser, parser.parse_args(argv), CASES)


def main(argv=None) -> None:
    """Build (or reuse) the model, run each case in its own subprocess, print the tables, write --json."""
    args = parse_args(argv)
    if args.case:
        run_case(args)
        return
    run_benchmark(args, argv, args.case_list, __file__, lambda results, work_dir: summarise(args, results, work_dir), print_report)


def run_case(args) -> None:
    """Child process: run one case and write its result dict as JSON to --result."""
    import warnings

    warnings.filterwarnings("ignore")
    result = case_build(args) if args.case == "build" else case_mode(args)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)


def case_mode(args) -> dict:
    """One stage of the job in one memory mode (the case's name: MODE-STAGE)."""
    import numpy as np
    import torch

    from backend.engine.decode import decode_canvas, decode_pole_caps
    from backend.engine.denoiser import GuidedUNetDenoiser
    from backend.engine.models import ModelCache
    from backend.app.job import check_request
    from backend.engine.memory import StagePlacement, plan_memory
    from backend.request import GenerateRequest

    mode, stage = args.case.split("-")
    request = GenerateRequest(
        prompt=args.prompt, layout="equirect", width=args.width, height=args.width // 2, seed=args.seed,
        view_batch=args.view_batch, guidance=args.guidance, model=args.model_dir, device=args.device, dtype=args.dtype,
        memory=mode, out=os.path.join(os.path.dirname(args.result), "unused-out"),
    )
    checked = check_request(request)
    device, dtype = checked.device, checked.dtype
    memory, clock = PeakMemory(device), Clock(device)
    began = clock()
    model = ModelCache().get(checked)
    pipeline = model.pipeline
    resolved = checked.resolved_for(model)
    request, views = resolved.params, resolved.views
    plan = plan_memory(request, device, dtype, pipeline.unet.config, pipeline.vae.config, len(views))
    placement = StagePlacement(pipeline, device, plan.offload)
    result = {"plan": plan.to_dict(), "views": len(views), "view_set": request.views, "load_s": clock() - began}
    channels, factor = model.geometry.latent_channels, model.geometry.vae_scale_factor
    if stage == "denoise":
        began = clock()
        placement.enter("text")
        embeds, negative = pipeline.encode_prompt([request.prompt], device, 1, True, None)
        result["text_s"] = clock() - began
        placement.enter("denoise")
        denoiser = GuidedUNetDenoiser(pipeline.unet, embeds, negative, request.guidance)
        count = min(args.probe_views, len(views))
        noise = torch.randn(count, channels, views.size, views.size,
                            generator=torch.Generator("cpu").manual_seed(args.seed)).to(device, dtype)
        timestep = torch.tensor(500, device=device)
        # Warm up on a small latent: the memory-mapped weights become resident, one-off costs are paid, and
        # what is measured after ``loaded`` is the stage's own memory (activations) and time.
        denoiser(noise[:1, :, :8, :8], timestep)
        memory.loaded()
        began = clock()
        for first in range(0, count, plan.view_batch):
            denoiser(noise[first : first + plan.view_batch], timestep)
            log(args.case, f"{min(first + plan.view_batch, count)}/{count} views at {clock() - began:.1f} s")
        seconds = clock() - began
        result.update(probe_views=count, denoise_s=seconds, per_view_s=seconds / count)
    else:
        latents = torch.randn(1, channels, request.height // factor, request.width // factor,
                              generator=torch.Generator("cpu").manual_seed(args.seed)).to(device, dtype)
        placement.enter("decode")
        pipeline.vae.decode(latents[:, :, :8, :8] / pipeline.vae.config.scaling_factor)  # warm up, as above
        memory.loaded()
        began = clock()
        image = decode_canvas(pipeline.vae, latents, views.canvas, in_strips=plan.strip_decode)
        image = decode_pole_caps(pipeline.vae, latents, image, in_strips=plan.strip_decode)
        result["decode_s"] = clock() - began
        log(args.case, f"decoded in {result['decode_s']:.1f} s")
        image = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.save(os.path.join(os.path.dirname(args.result), f"{mode}-image.npy"), image)
    result["memory"] = memory.result()
    return result


def summarise(args, results: dict, work_dir: str) -> dict:
    """Every printed number: per case its plan, seconds and memory; low / full ratios; the decodes' difference."""
    import numpy as np

    summary = {"settings": {name: value for name, value in vars(args).items() if name not in ("case", "result")},
               "machine": results["build"]["machine"], "cases": {case: results[case] for case in args.case_list},
               "wall_s": {case: result.get("wall_s") for case, result in results.items()}}
    images = {mode: os.path.join(work_dir, f"{mode}-image.npy") for mode in ("full", "low")}
    if all(os.path.exists(path) for path in images.values()):
        full, low = (np.load(path).astype(np.int16) for path in images.values())
        summary["decode_max_difference_255"] = int(np.abs(full - low).max())
        summary["decode_mean_difference_255"] = float(np.abs(full - low).mean())
    cases = summary["cases"]
    ratios = {}
    for stage, key in (("denoise", "per_view_s"), ("decode", "decode_s")):
        full, low = cases.get(f"full-{stage}", {}), cases.get(f"low-{stage}", {})
        if key in full and key in low:
            ratios[f"{stage}_time_low_over_full"] = low[key] / full[key]
            peaks = [case["memory"].get("peak_mib") for case in (full, low)]
            if all(peaks):
                ratios[f"{stage}_peak_low_over_full"] = peaks[1] / peaks[0]
                work = [case["memory"]["peak_mib"] - case["memory"]["loaded_mib"] for case in (full, low)]
                ratios[f"{stage}_work_low_over_full"] = work[1] / work[0] if work[0] > 0 else None
    if all("failed" not in cases.get(f"{mode}-{stage}", {"failed": "not run"}) for mode in ("full", "low") for stage in ("denoise", "decode")):
        views = cases["full-denoise"]["views"]
        for mode in ("full", "low"):
            ratios[f"projected_job_{mode}_s"] = (views * JOB_STEPS * cases[f"{mode}-denoise"]["per_view_s"]
                                                 + cases[f"{mode}-decode"]["decode_s"])
        ratios["projected_job_time_low_over_full"] = ratios["projected_job_low_s"] / ratios["projected_job_full_s"]
    summary["ratios"] = ratios
    return summary


def print_report(summary: dict) -> None:
    """The tables: one row per case, then the ratios."""
    machine = summary["machine"]
    print(f"\nMemory modes: {summary['settings']['width']}x{summary['settings']['width'] // 2} equirect, SD2-base "
          f"architecture with random weights; {machine.get('device')} {machine.get('dtype')}")
    rows = []
    for case, result in summary["cases"].items():
        if "failed" in result:
            rows.append([case, "FAILED: " + result["failed"]] + [""] * 7)
            continue
        memory, plan = result["memory"], result["plan"]
        seconds = result.get("per_view_s", result.get("decode_s"))
        work = None if memory["peak_mib"] is None else memory["peak_mib"] - memory["loaded_mib"]
        rows.append([case, plan["mode"], plan["view_batch"], "yes" if plan["offload"] else "no",
                     "yes" if plan["strip_decode"] else "no", f"{seconds:.2f}" + (" /view" if "per_view_s" in result else ""),
                     _mib(memory["loaded_mib"]), _mib(memory["peak_mib"]), _mib(work)])
    print_table(["case", "mode", "view batch", "offload", "strips", "seconds", "loaded MiB", "peak MiB", "work MiB"], rows)
    print()
    for name, value in summary["ratios"].items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    if "decode_max_difference_255" in summary:
        print(f"decoded images, low against full: max {summary['decode_max_difference_255']}/255, "
              f"mean {summary['decode_mean_difference_255']:.4f}/255")


def _mib(value) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
