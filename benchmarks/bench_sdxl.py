#!/usr/bin/env python3
"""Seconds per step and peak memory of a 2048x1024 world: the SDXL architecture against SD2-base, same run.

Two models with random weights, built here from the real configs (nothing is downloaded): Stable Diffusion 2
base (``bench_multidiffusion.py``'s ``SD2_UNET``, ``SD_VAE``, ``SD2_TEXT``) and Stable Diffusion XL base 1.0
(``SDXL_UNET``, ``SDXL_VAE``, ``SDXL_TEXT``, ``SDXL_TEXT_2`` below: the configs of
stabilityai/stable-diffusion-xl-base-1.0's unet, vae, text_encoder and text_encoder_2, written out because
diffusers ships no named SDXL config). Each case runs in a fresh subprocess (its peak memory is its own) and
goes through the product's denoising stage (``check_request``, the model cache, ``generation.denoise``: text
encoding, noise, the loop) on an equirect world with the shifted schedule (``--schedule shifted``: one set of
non-overlapping windows per step), each model at its own native window (64 latents for SD2, 128 for SDXL).

Printed per model: views per step, UNet rows per step, the first step (text encoding and one-off costs
included) and the later steps' mean in seconds, seconds per UNet row, and memory (the peak resident set size
of the process, and what the denoising added to the memory after the weights were paged in), then SDXL / SD2
ratios. Decoding is left out: both use the same VAE architecture.

    nice python benchmarks/bench_sdxl.py --model-dir /tmp/bench-models      # CPU, 2 steps: see benchmarks/README.md
    python benchmarks/bench_sdxl.py --device cuda --steps 10 --view-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the models are built here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), HERE]

from bench_multidiffusion import (  # noqa: E402
    SD2_TEXT,
    SD2_UNET,
    SD_VAE,
    Clock,
    PeakMemory,
    UNetCounter,
    add_shared_arguments,
    later_mean,
    log,
    machine_info,
    print_table,
    run_benchmark,
)

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json (2.6B parameters).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # six time ids x 256 + the 1280-wide pooled embedding
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
# Its vae/config.json: SD's VAE architecture, SDXL's latent scale; the original VAE overflows in float16.
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14, with projection); model_factory adds
# bos/eos/pad ids matching its character tokenizer.
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)
SDXL_POOLED = 1280  # text_encoder_2's projection_dim

MODELS = ("sd2", "sdxl")
TITLES = {"sd2": "SD2-base (window 64 latents)", "sdxl": "SDXL base (window 128 latents)"}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (the parent's flags; each case subprocess gets the same ones plus --case/--result)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=2048, help="equirect width in px (height: width / 2)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of each job (the first carries one-off costs)")
    parser.add_argument("--schedule", default="shifted", choices=("shifted", "dense"), help="the view schedule")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--cases", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    add_shared_arguments(parser, view_batch=4, prompt="a sunlit alpine valley with a lake, 360 panorama")
    args = parser.parse_args(argv)
    args.case_list = [name.strip() for name in args.cases.split(",") if name.strip()]
    if set(args.case_list) - set(MODELS):
        parser.error(f"--cases takes a subset of {', '.join(MODELS)}")
    return args


def main(argv=None) -> None:
    """Build (or reuse) both models, run each case in its own subprocess, print the table, write --json."""
    args = parse_args(argv)
    if args.case:
        run_case(args)
        return
    run_benchmark(args, argv, args.case_list, __file__, lambda results, work_dir: summarise(args, results), print_report)


def run_case(args) -> None:
    """Child process: build the models ("build") or time one model's job; writes the result dict to --result."""
    import warnings

    import diffusers
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = case_build(args) if args.case == "build" else case_model(args)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)


def model_folders(model_dir: str) -> dict:
    """{model: its folder} under ``--model-dir`` (one folder holds both random models)."""
    return {name: os.path.join(model_dir, name) for name in MODELS}


def case_build(args) -> dict:
    """Save both random models under --model-dir unless they are there; parameter counts from the configs."""
    import torch
    from diffusers import UNet2DConditionModel

    from model_factory import save_random_sd_model, save_random_sdxl_model

    dtype = torch.float32 if args.dtype in ("auto", "float32") else getattr(torch, args.dtype)
    # Build in that dtype from the start: SDXL's 3.5B parameters built in float32 and then converted would hold
    # both copies (21 GB for bfloat16).
    torch.set_default_dtype(dtype)
    built = {}
    for name, folder in model_folders(args.model_dir).items():
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            built[name] = "reused"
            continue
        began = time.perf_counter()
        log("build", f"building {name} with random weights in {folder} ...")
        if name == "sd2":
            save_random_sd_model(folder, unet_config=SD2_UNET, vae_config=SD_VAE, text_config=SD2_TEXT, dtype=dtype)
        else:
            save_random_sdxl_model(folder, unet_config=SDXL_UNET, vae_config=SDXL_VAE, text_config=SDXL_TEXT,
                                   text_2_config=SDXL_TEXT_2, pooled_width=SDXL_POOLED, dtype=dtype)
        built[name] = f"built in {time.perf_counter() - began:.0f} s"
    with torch.device("meta"):
        unet_params = {name: sum(p.numel() for p in UNet2DConditionModel(**config).parameters()) / 1e6
                       for name, config in (("sd2", SD2_UNET), ("sdxl", SDXL_UNET))}
    return {"model": {"built": built, "unet_params_m": unet_params}, "machine": machine_info(args)}


def case_model(args) -> dict:
    """One model's world job through ``generation.denoise``: per-step seconds, UNet rows, memory."""
    import torch

    from backend.app.job import check_request
    from backend.engine.generation import denoise
    from backend.engine.models import ModelCache, weighted_components
    from backend.request import GenerateRequest

    request = GenerateRequest(
        prompt=args.prompt, layout="equirect", width=args.width, height=args.width // 2, steps=args.steps,
        guidance=args.guidance, seed=args.seed, scheduler="ddim", schedule=args.schedule, view_batch=args.view_batch,
        model=model_folders(args.model_dir)[args.case], device=args.device, dtype=args.dtype, no_hdr=True,
        out=os.path.join(os.path.dirname(args.result), "unused-out"),  # required by validation; nothing is written
    )
    checked = check_request(request)
    memory, clock = PeakMemory(checked.device), Clock(checked.device)
    began = clock()
    model = ModelCache().get(checked)
    with torch.no_grad():  # page the memory-mapped weights in, so the measured work is the job's own
        for module in weighted_components(model.pipeline).values():
            for parameter in module.parameters():
                parameter.sum()
    load_s = clock() - began
    memory.loaded()
    log(args.case, f"model loaded and paged in in {load_s:.1f} s")
    resolved = checked.resolved_for(model)
    counter = UNetCounter(model.pipeline.unet)
    stamps = [clock()]

    def report(stage, step, total, preview):
        stamps.append(clock())
        log(args.case, f"step {step}/{total} at {stamps[-1] - stamps[0]:.1f} s")

    _, _, details = denoise(resolved, model, report)
    steps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    weights = sum(p.numel() * p.element_size() for module in weighted_components(model.pipeline).values()
                  for p in module.parameters())
    return {"window": resolved.params.window, "views": details["views"],
            "views_per_step": details["views_per_step"]["mean"], "unet_rows": counter.rows,
            "unet_calls": counter.calls, "step_s": steps, "first_step_s": steps[0], "later_step_s": later_mean(steps),
            "load_s": load_s, "weights_mib": weights / 2**20, "memory": memory.result()}


def summarise(args, results: dict) -> dict:
    """Every printed number: per model its result; SDXL / SD2 ratios."""
    summary = {"settings": {key: value for key, value in vars(args).items() if key not in ("case", "result")},
               "machine": results["build"]["machine"], "model": results["build"]["model"],
               "cases": {name: results[name] for name in args.case_list},
               "wall_s": {name: result.get("wall_s") for name, result in results.items()}}
    sd2, sdxl = summary["cases"].get("sd2", {}), summary["cases"].get("sdxl", {})
    ratios = {}
    if "failed" not in sd2 and "failed" not in sdxl and sd2 and sdxl:
        ratios["later_step_s_sdxl_over_sd2"] = sdxl["later_step_s"] / sd2["later_step_s"]
        ratios["s_per_unet_row_sdxl_over_sd2"] = ((sdxl["later_step_s"] * args.steps / sdxl["unet_rows"])
                                                  / (sd2["later_step_s"] * args.steps / sd2["unet_rows"]))
        ratios["process_peak_sdxl_over_sd2"] = sdxl["memory"]["process_peak_mib"] / sd2["memory"]["process_peak_mib"]
        if sdxl["memory"]["peak_mib"] and sd2["memory"]["peak_mib"]:
            work = [case["memory"]["peak_mib"] - case["memory"]["loaded_mib"] for case in (sd2, sdxl)]
            ratios["work_sdxl_over_sd2"] = work[1] / work[0] if work[0] > 0 else None
    summary["ratios"] = ratios
    return summary


def print_report(summary: dict) -> None:
    """The header, one row per model, the ratios."""
    settings, machine = summary["settings"], summary["machine"]
    print(f"\nMachine: {machine['device_name']} ({machine['device']}, {machine['dtype']}, {machine['torch_threads']} "
          f"torch threads), torch {machine['torch']}, diffusers {machine['diffusers']}")
    print(f"{settings['width']}x{settings['width'] // 2} equirect world, {settings['schedule']} schedule, "
          f"{settings['steps']} DDIM steps, guidance {settings['guidance']}, view batch {settings['view_batch']}; "
          f"random weights (UNet parameters: " + ", ".join(f"{name} {count:.0f}M" for name, count in
                                                          summary["model"]["unet_params_m"].items()) + ")")
    rows = []
    for name, case in summary["cases"].items():
        if "failed" in case:
            rows.append([TITLES[name], "FAILED: " + case["failed"]] + [""] * 7)
            continue
        memory = case["memory"]
        work = None if memory["peak_mib"] is None else memory["peak_mib"] - memory["loaded_mib"]
        rows.append([TITLES[name], f"{case['views_per_step']:.1f}", f"{case['unet_rows'] / settings['steps']:.0f}",
                     f"{case['first_step_s']:.1f}", f"{case['later_step_s']:.1f}",
                     f"{case['later_step_s'] * settings['steps'] / case['unet_rows']:.2f}",
                     f"{case['weights_mib']:.0f}", f"{memory['process_peak_mib']:.0f}",
                     "-" if work is None else f"{work:.0f}"])
    print_table(["model", "views/step", "UNet rows/step", "first step s", "later steps s", "s/UNet row",
                 "weights MiB", "peak MiB", "work MiB"], rows)
    print()
    for name, value in summary["ratios"].items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"Memory: {machine['memory_note']}; work = the peak during the job minus the memory once the weights "
          "were paged in (activations, the text encoders' outputs and the views' latents).")


if __name__ == "__main__":
    main()
