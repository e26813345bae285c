#!/usr/bin/env python3
"""The device check of the GPU path (issue 17, item 6): what SyncSphere's jobs cost on one CUDA GPU.

On a model with the full Stable Diffusion 2 base architecture and random weights (configs from
``bench_multidiffusion.py``, built and saved once in float16 with ``tests/model_factory.py``; nothing is
downloaded), in float16 on CUDA with the product's defaults there (scaled-dot-product attention, channels_last
UNet and VAE, the view batch chosen from free memory by ``--memory auto``), each job goes through the product's
entry points, ``backend.app.job.check_request`` and ``run_job`` (files written to a temporary folder), with one
model cache for the whole run, as the worker keeps it:

| jobs | what |
|---|---|
| world, wide, tile | a 2048x1024 equirect world, a 2048x512 wide panorama and a 512x512 tile, each with ``--schedule dense`` and ``--schedule shifted``, at 50 DDIM steps (guidance 7.5) and at 4 LCM steps (``--scheduler lcm --guidance 1``: one UNet row per view, as an LCM-LoRA runs; random weights, so it times the schedule, not an LCM's images) |
| panorama | diffusers' ``StableDiffusionPanoramaPipeline`` on the same 2048x512 wide canvas with the same views (window 64, stride 8), the same model's modules, DDIM 50 steps and the view batch our dense wide job chose: against our dense wide DDIM job (MultiDiffusion) |
| compile | ``--compile`` on the shifted world at 50 DDIM steps, twice with the same model cache: the first job compiles the UNet, the second reuses it |
| sdxl | a second model with the full SDXL base architecture (``bench_sdxl.py``'s configs, random weights in float16, its scheduler Euler ancestral with trailing timesteps as SDXL-Turbo ships), built when its jobs start: the 2048x1024 world with the shifted schedule at 50 DDIM steps (guidance 7.5) and a Turbo-style run at 4 steps of the model's own trailing scheduler (``--scheduler auto --guidance 1``); ``--memory auto`` plans them (metadata's plan is printed) |

A one-view, one-step job first loads the model and warms the GPU up; no table row pays for it. Each row prints
as soon as its job ends (so a run cut short still shows what it measured): seconds of the job (``run_job``,
model already loaded), denoising and decoding seconds (metadata.json's timings), views per step, UNet rows and
UNet rows per second (metadata's ``unet_rows`` / denoising seconds), the view batch chosen, and peak memory
(CUDA: ``torch.cuda.max_memory_allocated`` during the job, weights included; CPU: the peak resident set size).

No case starts after ``--deadline-s`` seconds of the run, and the compile case not after
``--compile-deadline-s`` (compiling the UNet takes a minute or two), so ``gpu_check.sh`` ends in under 8 minutes
on one H100/H200; the SDXL jobs come last and are skipped when the SD2 part used the time: ``--models sdxl`` runs
them alone (building SDXL's 7 GB takes a minute or two). ``--tiny`` runs the same code on the CPU with the tests' tiny model (its UNet trained size set
to 64 latents, so every job has the views it has with SD2) and 10 DDIM steps: it proves the script runs.

    bash benchmarks/gpu_check.sh                    # on the GPU machine
    bash benchmarks/gpu_check.sh --models sdxl      # the SDXL jobs alone
    python benchmarks/gpu_check.py --tiny           # here, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the model is built here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), HERE]

from bench_multidiffusion import (  # noqa: E402
    SD2_TEXT,
    SD2_UNET,
    SD_VAE,
    STRIDE,
    WINDOW,
    Clock,
    PeakMemory,
    check_model_folder,
    log,
    machine_info,
)
from bench_sdxl import SDXL_POOLED, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE  # noqa: E402

CANVASES = {"world": ("equirect", 2048, 1024), "wide": ("wide", 2048, 512), "tile": ("tile", 512, 512)}
SCHEDULES = ("dense", "shifted")
LCM_STEPS = 4
TURBO_STEPS = 4
MODELS = ("sd2", "sdxl")
TINY_DDIM_STEPS = 10
PROMPT = "a sunlit alpine valley with a lake"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model on the CPU in float32: proves the "
                        "script runs where there is no GPU")
    parser.add_argument("--model-dir", help="folder for the random model: built there if absent, reused if present "
                        "(default: a temporary folder, deleted at the end)")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default 50; {TINY_DDIM_STEPS} with --tiny)")
    parser.add_argument("--canvases", default=",".join(CANVASES), help="comma-separated subset of world, wide, tile")
    parser.add_argument("--no-lcm", action="store_true", help="leave out the 4-step LCM jobs")
    parser.add_argument("--no-panorama", action="store_true", help="leave out diffusers' panorama pipeline")
    parser.add_argument("--no-compile", action="store_true", help="leave out the --compile jobs")
    parser.add_argument("--deadline-s", type=float, default=400.0, help="start no job after this many seconds")
    parser.add_argument("--compile-deadline-s", type=float, default=260.0,
                        help="start the compile jobs only before this many seconds")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of sd2, sdxl")
    parser.add_argument("--keep", help="keep the jobs' output folders under this folder")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    args.canvas_list = [name.strip() for name in args.canvases.split(",") if name.strip()]
    if set(args.canvas_list) - set(CANVASES):
        parser.error(f"--canvases takes a subset of {', '.join(CANVASES)}")
    args.model_list = [name.strip() for name in args.models.split(",") if name.strip()]
    if not args.model_list or set(args.model_list) - set(MODELS):
        parser.error(f"--models takes a subset of {', '.join(MODELS)}")
    if args.steps is None:
        args.steps = TINY_DDIM_STEPS if args.tiny else 50
    return args


def main(argv=None) -> int:
    """Build or reuse the model, run the jobs, print a row per job and the comparison; returns the exit code."""
    args = parse_args(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work_dir:
        model_dir = os.path.abspath(args.model_dir) if args.model_dir else os.path.join(work_dir, "model")
        device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "float16")
        build_s = build_model(model_dir, args.tiny, dtype) if "sd2" in args.model_list else 0.0
        machine = machine_info(argparse.Namespace(device=device, dtype=dtype))
        print(f"Machine: {machine['device_name']} ({device}, {dtype}), torch {machine['torch']}, diffusers "
              f"{machine['diffusers']}; model {'tiny (tests)' if args.tiny else 'SD2-base architecture'}, random "
              f"weights, built in {build_s:.0f} s", flush=True)
        sdxl_dir = os.path.join(os.path.dirname(model_dir), os.path.basename(model_dir) + "-sdxl")
        check = Check(args, model_dir, args.keep or work_dir, device, dtype, began, sdxl_dir)
        check.run_all()
    summary = {"settings": {key: value for key, value in vars(args).items()}, "machine": machine, "rows": check.rows,
               "skipped": check.skipped, "wall_s": time.perf_counter() - began}
    print_summary(summary)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


def build_model(folder: str, tiny: bool, dtype: str) -> float:
    """Save the random model into ``folder`` unless it is there (checked to be the same architecture); returns
    the seconds it took. Tiny: the tests' configs, the UNet's trained size set to SD2's 64 latents."""
    import torch

    from model_factory import TINY_TEXT, TINY_UNET, TINY_VAE, save_random_sd_model

    began = time.perf_counter()
    configs = ({**TINY_UNET, "sample_size": WINDOW}, TINY_VAE, TINY_TEXT) if tiny else (SD2_UNET, SD_VAE, SD2_TEXT)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        if not tiny:
            check_model_folder(folder)
        return 0.0
    log("build", f"building the {'tiny' if tiny else 'SD2-base'} model with random weights in {folder} ...")
    save_random_sd_model(folder, unet_config=configs[0], vae_config=configs[1], text_config=configs[2],
                         dtype=getattr(torch, dtype))
    return time.perf_counter() - began


def build_sdxl_model(folder: str, tiny: bool, dtype: str) -> float:
    """Save the random SDXL model into ``folder`` unless it is there; returns the seconds it took. Its scheduler is
    Euler ancestral with trailing timesteps (SDXL-Turbo's), so ``--scheduler auto`` runs it as a few-step model.
    Tiny: the tests' tiny SDXL with SDXL's trained size (128 latents), so the world has SDXL's views."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    from model_factory import SDXL_SCHEDULER, TINY_SDXL_UNET, save_random_sdxl_model

    began = time.perf_counter()
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return 0.0
    log("build", f"building the {'tiny SDXL' if tiny else 'SDXL'} model with random weights in {folder} ...")
    # SDXL's betas (the DDIM config's other fields are DDIM's own), trailing timesteps.
    scheduler = EulerAncestralDiscreteScheduler(
        **{key: SDXL_SCHEDULER[key] for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset")},
        timestep_spacing="trailing")
    if tiny:
        save_random_sdxl_model(folder, unet_config={**TINY_SDXL_UNET, "sample_size": 128}, scheduler=scheduler)
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))  # built in float16: 7 GB rather than 14 GB and a copy
        try:
            save_random_sdxl_model(folder, unet_config=SDXL_UNET, vae_config=SDXL_VAE, text_config=SDXL_TEXT,
                                   text_2_config=SDXL_TEXT_2, pooled_width=SDXL_POOLED, scheduler=scheduler,
                                   dtype=getattr(torch, dtype))
        finally:
            torch.set_default_dtype(default)
    return time.perf_counter() - began


class Check:
    """The run's jobs with one model cache; ``rows``: one dict per finished job, ``skipped``: names not run."""

    def __init__(self, args, model_dir: str, out_root: str, device: str, dtype: str, began: float,
                 sdxl_dir: str | None = None):
        from backend.engine.models import ModelCache

        self.args, self.model_dir, self.out_root, self.sdxl_dir = args, model_dir, out_root, sdxl_dir
        self.device, self.dtype, self.began = device, dtype, began
        self.cache = ModelCache()
        self.rows, self.skipped = [], []

    def run_all(self) -> None:
        """The warm-up, the table's jobs, the panorama comparison, the compile jobs, then the SDXL jobs, each
        while time is left (``--models`` picks SD2's, SDXL's or both)."""
        if "sd2" in self.args.model_list:
            self.run_sd2()
        if "sdxl" in self.args.model_list and self.time_left("sdxl build", self.args.deadline_s):
            build_s = build_sdxl_model(self.sdxl_dir, self.args.tiny, self.dtype)
            print(f"SDXL model {'reused' if not build_s else f'built in {build_s:.0f} s'}", flush=True)
            self.job("sdxl warm-up", "world", "shifted", "turbo", steps=1, record=False, model_dir=self.sdxl_dir)
            self.job("sdxl world shifted ddim", "world", "shifted", "ddim", model_dir=self.sdxl_dir)
            self.job("sdxl world shifted turbo", "world", "shifted", "turbo", model_dir=self.sdxl_dir)

    def run_sd2(self) -> None:
        """SD2's jobs: the warm-up, the table's jobs, the panorama comparison, the compile jobs."""
        self.job("warm-up", "tile", "shifted", "lcm", steps=1, record=False)
        plans = [(canvas, schedule, sampler) for sampler in ("ddim",) + (() if self.args.no_lcm else ("lcm",))
                 for canvas in self.args.canvas_list for schedule in SCHEDULES]
        for canvas, schedule, sampler in plans:
            self.job(f"{canvas} {schedule} {sampler}", canvas, schedule, sampler)
        if not self.args.no_panorama and "wide" in self.args.canvas_list:
            self.panorama()
        if not self.args.no_compile and "world" in self.args.canvas_list:
            first = self.job("world shifted ddim compile #1", "world", "shifted", "ddim", compile=True,
                             deadline=self.args.compile_deadline_s)
            if first is not None:  # the second job is the one that reuses what the first compiled
                self.job("world shifted ddim compile #2", "world", "shifted", "ddim", compile=True)

    def time_left(self, name: str, deadline: float) -> bool:
        """Whether a job may start before ``deadline`` seconds of the run; else it is listed as skipped."""
        if time.perf_counter() - self.began < deadline:
            return True
        self.skipped.append(name)
        print(f"{name}: skipped, the run is past {deadline:.0f} s", flush=True)
        return False

    def job(self, name: str, canvas: str, schedule: str, sampler: str, steps: int | None = None, compile: bool = False,
            record: bool = True, deadline: float | None = None, model_dir: str | None = None) -> dict | None:
        """One job through ``check_request`` and ``run_job`` with ``model_dir`` (default: the SD2 model); its row
        (also printed) when ``record``. sampler: ddim (guidance 7.5), lcm (``LCM_STEPS``, guidance 1) or turbo (the
        model's own scheduler, ``--scheduler auto``, ``TURBO_STEPS``, guidance 1)."""
        from backend.app.job import check_request, run_job
        from backend.request import GenerateRequest

        if not self.time_left(name, self.args.deadline_s if deadline is None else deadline):
            return None
        layout, width, height = CANVASES[canvas]
        few = {"lcm": LCM_STEPS, "turbo": TURBO_STEPS}.get(sampler)
        request = GenerateRequest(
            prompt=PROMPT, layout=layout, width=width, height=height, seed=1, schedule=schedule,
            scheduler="auto" if sampler == "turbo" else sampler, steps=steps or few or self.args.steps,
            guidance=1.0 if few else 7.5, model=model_dir or self.model_dir, device=self.device, dtype=self.dtype,
            compile=compile, overwrite=True,
            out=os.path.join(self.out_root, name.replace(" ", "-").replace("#", "")))
        checked = check_request(request)
        self.cache.get(checked)  # loaded (the warm-up) or cached: no row pays for loading
        memory, clock = PeakMemory(checked.device), Clock(checked.device)
        memory.loaded()
        began = clock()
        outputs = run_job(checked, models=self.cache)
        seconds = clock() - began
        with open(outputs["metadata"], encoding="utf-8") as f:
            metadata = json.load(f)
        if not self.args.keep:
            shutil.rmtree(request.out, ignore_errors=True)
        if not record:
            return None
        timings = metadata["timings"]
        row = {"job": name, "layout": layout, "size": f"{width}x{height}", "schedule": metadata["schedule"],
               "scheduler": metadata["scheduler"], "steps": request.steps, "job_s": seconds,
               "denoise_s": timings["denoising_s"], "decode_s": timings["decoding_s"],
               "views": metadata["views"], "views_per_step": metadata["views_per_step"]["mean"],
               "unet_rows": metadata["unet_rows"], "rows_per_s": metadata["unet_rows"] / timings["denoising_s"],
               "view_batch": metadata["memory"]["view_batch_used"],
               "view_batch_reason": metadata["memory"]["view_batch_reason"], "memory_mode": metadata["memory"]["mode"],
               "peak_mib": memory.result()["peak_mib"], "compile": metadata.get("compile")}
        self.rows.append(row)
        print_row(row)
        return row

    def panorama(self) -> None:
        """diffusers' StableDiffusionPanoramaPipeline on the wide canvas, from our cached model's modules (the same
        weights, dtype and memory format), DDIM, window 64 and stride 8 as ours, our dense wide job's view batch."""
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

        from backend.app.job import check_request
        from backend.request import GenerateRequest

        name = "wide dense ddim: diffusers panorama"
        ours = next((row for row in self.rows if row["job"] == "wide dense ddim"), None)
        if ours is None or not self.time_left(name, self.args.deadline_s):
            return
        _, width, height = CANVASES["wide"]
        checked = check_request(GenerateRequest(prompt=PROMPT, layout="wide", width=width, height=height,
                                                model=self.model_dir, device=self.device, dtype=self.dtype,
                                                out=os.path.join(self.out_root, "unused")))
        model = self.cache.get(checked)
        parts = model.pipeline
        pipeline = StableDiffusionPanoramaPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            scheduler=DDIMScheduler.from_config(parts.scheduler.config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        views = len(pipeline.get_views(height, width, window_size=WINDOW, stride=STRIDE))
        memory, clock = PeakMemory(model.device), Clock(model.device)
        prompt_embeds, negative_embeds = pipeline.encode_prompt(PROMPT, model.device, 1, True, None)
        memory.loaded()
        stamps = []
        began = clock()
        pipeline(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height, width=width,
                 num_inference_steps=self.args.steps, guidance_scale=7.5, view_batch_size=ours["view_batch"],
                 generator=torch.Generator("cpu").manual_seed(1), output_type="np",
                 callback_on_step_end=lambda pipe, index, timestep, tensors: stamps.append(clock()) or {})
        ended = clock()
        rows = views * 2 * self.args.steps  # classifier-free guidance: two rows per view and step
        # The pipeline decodes (one vae.decode of the whole canvas) right after the last step's callback.
        row = {"job": name, "layout": "wide", "size": f"{width}x{height}", "schedule": "dense", "scheduler": "DDIMScheduler",
               "steps": self.args.steps, "job_s": ended - began, "denoise_s": stamps[-1] - began,
               "decode_s": ended - stamps[-1], "views": views, "views_per_step": views, "unet_rows": rows,
               "rows_per_s": rows / (stamps[-1] - began), "view_batch": ours["view_batch"],
               "view_batch_reason": "our dense wide job's", "peak_mib": memory.result()["peak_mib"], "compile": None,
               "ours_over_diffusers_denoise": ours["denoise_s"] / (stamps[-1] - began)}
        self.rows.append(row)
        print_row(row)


HEADER = (f"{'job':<38}{'steps':>6}{'job s':>8}{'denoise s':>10}{'decode s':>9}{'views/step':>11}{'UNet rows':>10}"
          f"{'rows/s':>9}{'batch':>6}{'peak MiB':>10}")
_printed_header = []


def print_row(row: dict) -> None:
    """One table row on stdout (the header before the first)."""
    if not _printed_header:
        print(HEADER, flush=True)
        _printed_header.append(True)
    peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
    print(f"{row['job']:<38}{row['steps']:>6}{row['job_s']:>8.2f}{row['denoise_s']:>10.2f}{row['decode_s']:>9.2f}"
          f"{row['views_per_step']:>11.1f}{row['unet_rows']:>10}{row['rows_per_s']:>9.0f}{row['view_batch']:>6}{peak:>10}",
          flush=True)


def print_summary(summary: dict) -> None:
    """The comparison with diffusers, the compile jobs, the view batch choices, skipped jobs and wall time."""
    rows = {row["job"]: row for row in summary["rows"]}
    print()
    panorama = rows.get("wide dense ddim: diffusers panorama")
    if panorama is not None:
        ours = rows["wide dense ddim"]
        print(f"MultiDiffusion, wide 2048x512, {panorama['views']} views (ours {ours['views']}), view batch "
              f"{panorama['view_batch']}: ours {ours['denoise_s']:.2f} s, diffusers' panorama pipeline "
              f"{panorama['denoise_s']:.2f} s of denoising: ours / diffusers = {panorama['ours_over_diffusers_denoise']:.3f}")
    compiled = [row for row in summary["rows"] if row["compile"]]
    plain = rows.get("world shifted ddim")
    if compiled and plain is not None:
        print("--compile, world shifted ddim: " + "; ".join(
            f"{row['job'].split()[-1]} {row['denoise_s']:.2f} s (reused: {row['compile']['reused']})" for row in compiled)
            + f"; without: {plain['denoise_s']:.2f} s")
    reasons = sorted({f"{row['view_batch']} ({row['view_batch_reason']})" for row in summary["rows"]
                      if row["view_batch_reason"] != "our dense wide job's"})
    print("View batches chosen: " + "; ".join(reasons))
    modes = [f"{row['job']}: {row['memory_mode']}" for row in summary["rows"] if row["job"].startswith("sdxl")]
    if modes:
        print("SDXL memory plans: " + "; ".join(modes))
    if summary["skipped"]:
        print("Skipped (time): " + ", ".join(summary["skipped"]))
    print(f"Wall time {summary['wall_s']:.0f} s (model build included).")


if __name__ == "__main__":
    sys.exit(main())
