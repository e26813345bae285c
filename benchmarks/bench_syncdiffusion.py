#!/usr/bin/env python3
"""Benchmark SyncDiffusion against MultiDiffusion: time, peak memory, operation count and coherence.

On a model with the full Stable Diffusion 2 base architecture and random weights (built by
``bench_multidiffusion.py``'s machinery; nothing is downloaded), one ``wide`` canvas, one seed, DDIM, each
case runs the engine's own denoising stage (``backend.engine.generation.denoise``: the product's code path, guidance
built from the same request fields as ``python -m backend generate``), then the tiled decode, then
measures the result's Intra-LPIPS (``backend.analysis.metrics``). Cases:

| case | what |
|---|---|
| multidiffusion | the baseline: ``--sync multidiffusion`` |
| paper-exact | ``--sync syncdiffusion`` guided on every step (w = 20, decay 0.95, LPIPS-VGG, the model's VAE) |
| paper-first | the same, guided only on the first ``--first-steps`` steps (the paper's script: 10 of 50) |
| taesd | all steps, ``--sync-decoder`` a full-size AutoencoderTiny (TAESD architecture, random weights) |
| reuse-eps | all steps, ``--sync-reuse-eps`` (no second UNet pass on guided steps) |
| loss-size | all steps, ``--sync-loss-size`` (LPIPS on smaller images) |
| checkpointing | all steps, ``--sync-checkpointing`` (memory for time) |
| best | taesd + reuse-eps + loss-size, guided on the first ``--best-steps`` steps |

Each case runs in a fresh subprocess (peak memory is its own). The operation count of a case is exact for
the work it did: forward hooks count the rows (samples) that went through the UNet, the VAE or tiny decoder
and the LPIPS network with and without autograd, and a ``flops`` case measures each network's floating-point
operations per row on the meta device with ``torch.utils.flop_counter`` (forward; forward + input gradient;
with gradient checkpointing). Time ratio / FLOP ratio is how far a case is from its arithmetic floor
relative to MultiDiffusion (1.00 = as fast as its operation count allows). Ratios are of the denoising
stage, where the cases differ; the decode is the same for all and printed separately.

With random weights the images are noise, so the Intra-LPIPS column shows that the machinery runs, not
how coherent a real model's panorama becomes; that needs the real weights (see benchmarks/README.md).
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
    SD2_UNET,
    Clock,
    PeakMemory,
    add_canvas_and_case_arguments,
    case_build,
    later_mean,
    log,
    machine_info,
    parse_case_list,
    run_benchmark,
)

# Guided steps out of 50 of each case when projected to the paper's 50-step schedule (Table S3; best: 3 of 50).
PROJECTED_GUIDED_OF_50 = {"paper-exact": 50, "paper-first": 10, "taesd": 50, "reuse-eps": 50, "loss-size": 50,
                          "checkpointing": 50, "best": 3}
CASES = ("multidiffusion", "paper-exact", "paper-first", "taesd", "reuse-eps", "loss-size", "checkpointing", "best")
# The targets (time ratio to MultiDiffusion), from the paper's Table S3 and what we aim for.
TARGETS = {"paper-exact": "<= 7.4 (paper)", "paper-first": "<= 2.5", "best": "<= 1.3"}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (the parent's flags; each case subprocess gets the same ones plus --case/--result)."""
    parser = argparse.ArgumentParser(
        description="Time SyncDiffusion (paper-exact, first steps, fast paths) against MultiDiffusion on a randomly "
        "initialised Stable Diffusion 2 base model, with operation counts and Intra-LPIPS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_canvas_and_case_arguments(parser, CASES, width=384, height=256, steps=4)
    parser.add_argument("--first-steps", type=int, default=1, help="guided steps of paper-first (paper: 10 of 50)")
    parser.add_argument("--best-steps", type=int, default=1, help="guided steps of best (Table S3: 3 of 50)")
    parser.add_argument("--loss-size", type=int, default=128, help="--sync-loss-size of loss-size and best")
    return parse_case_list(parser, parser.parse_args(argv), CASES)


# ================================================================================ the parent
def main(argv=None) -> None:
    """Build (or reuse) the models, run each case in its own subprocess, print the table, write --json."""
    args = parse_args(argv)
    if args.case:
        run_case(args)
        return
    run_benchmark(args, argv, ["flops", *args.case_list], __file__, lambda results, work_dir: summarise(args, results),
                  print_report)


def summarise(args, results: dict) -> dict:
    """Every printed number as one dict: per case its seconds, FLOPs, memory, Intra-LPIPS and the ratios."""
    flops, baseline = results["flops"], results["multidiffusion"]
    rows = {}
    for case in args.case_list:
        result = results[case]
        if "failed" in result:
            rows[case] = result
            continue
        operations = sum(count * flops["per_row"][key] for key, count in result["rows"].items())
        rows[case] = {**result, "denoise_tflop": operations / 1e12}
    base = rows["multidiffusion"]
    base_step = later_mean(base.get("step_s", []))
    for case, row in rows.items():
        if "failed" in row or "failed" in base:
            continue
        row["time_ratio"] = row["denoise_s"] / base["denoise_s"]
        row["flop_ratio"] = row["denoise_tflop"] / base["denoise_tflop"]
        row["time_over_flop_ratio"] = row["time_ratio"] / row["flop_ratio"]
        row["peak_ratio"] = None if row["memory"]["peak_mib"] is None or base["memory"]["peak_mib"] is None else (
            row["memory"]["peak_mib"] / base["memory"]["peak_mib"])
        guided = row["step_s"][: row["guided_steps"]]
        if guided and case in PROJECTED_GUIDED_OF_50:
            # 50 steps with K guided: K guided steps at this case's guided-step time, the rest at MultiDiffusion's.
            row["guided_step_s"] = later_mean(guided)
            k = PROJECTED_GUIDED_OF_50[case]
            row["projected_50_step_ratio"] = (k * row["guided_step_s"] + (50 - k) * base_step) / (50 * base_step)
        exact = rows.get("paper-exact", {})
        if "intra_lpips" in exact:
            row["intra_lpips_minus_paper_exact"] = row["intra_lpips"] - exact["intra_lpips"]
    return {
        "settings": {name: value for name, value in vars(args).items() if name not in ("case", "result")},
        "machine": results["build"]["machine"], "model": results["build"]["model"],
        "flops_per_row": flops["per_row"], "cases": rows,
        "wall_s": {name: result["wall_s"] for name, result in results.items()},
    }


def print_report(summary: dict) -> None:
    """The settings, then one row per case."""
    settings, machine, cases = summary["settings"], summary["machine"], summary["cases"]
    print()
    print(f"Machine: {machine['device_name']} ({machine['device']}, {machine['dtype']}), torch {machine['torch']}, "
          f"diffusers {machine['diffusers']}")
    first = next(row for row in cases.values() if "failed" not in row)
    print(f"SD2-base architecture, random weights; wide {settings['width']}x{settings['height']} px, window "
          f"{settings['window']} stride {settings['stride']} latents: {first['views']} views; {settings['steps']} DDIM "
          f"steps; view batch {settings['view_batch']}; seed {settings['seed']}; LPIPS trunk: {first.get('loss_backbone', '-')}")
    print(f"Memory: {machine['memory_note']}")
    headers = ["case", "guided", "denoise s", "time x", "TFLOP", "FLOP x", "time/FLOP", "peak MiB", "peak x",
               "Intra-LPIPS", "vs exact", "50-step x", "target"]
    table = []
    for case, row in cases.items():
        if "failed" in row:
            table.append([case, "FAILED: " + row["failed"]] + [""] * (len(headers) - 2))
            continue
        table.append([
            case, str(row["guided_steps"]), f"{row['denoise_s']:.1f}", f"{row['time_ratio']:.2f}",
            f"{row['denoise_tflop']:.1f}", f"{row['flop_ratio']:.2f}", f"{row['time_over_flop_ratio']:.2f}",
            _f(row["memory"]["peak_mib"], 0), _f(row["peak_ratio"], 2), f"{row['intra_lpips']:.4f}",
            _f(row.get("intra_lpips_minus_paper_exact"), 4, signed=True),
            _f(row.get("projected_50_step_ratio"), 2) + (f" ({PROJECTED_GUIDED_OF_50[case]}/50)" if case in PROJECTED_GUIDED_OF_50 else ""),
            TARGETS.get(case, ""),
        ])
    widths = [max(len(headers[i]), *(len(line[i]) for line in table)) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    decode = [row["decode_s"] for row in cases.values() if "failed" not in row]
    print(f"Decode (the same for every case): {min(decode):.1f}-{max(decode):.1f} s. time x, FLOP x, peak x: ratio to "
          "multidiffusion; time/FLOP: time x / FLOP x (1.00 = at the operation-count floor).")
    print("50-step x: the time ratio projected to 50 steps with the guided steps shown, from this run's guided-step "
          "seconds and MultiDiffusion's step seconds (first steps excluded where later ones exist).")
    print("TFLOP per row: " + ", ".join(f"{key} {value / 1e12:.3f}" for key, value in summary["flops_per_row"].items()))


def _f(value, digits: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


# ================================================================================ the children
def run_case(args) -> None:
    """Child process: run one case and write its result dict as JSON to --result."""
    import warnings

    warnings.filterwarnings("ignore")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.case == "build":
        result = case_build(args)
        result["taesd"] = build_tiny_autoencoder(args.model_dir)
    elif args.case == "flops":
        result = case_flops(args)
    else:
        result = case_generate(args)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)


def build_tiny_autoencoder(model_dir: str) -> str:
    """A full-size AutoencoderTiny (TAESD's default architecture) with random weights beside the model."""
    from model_factory import save_random_tiny_autoencoder

    folder = os.path.join(model_dir, "taesd-random")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        save_random_tiny_autoencoder(folder, config={})
    return folder


def sync_settings(args, case: str) -> dict:
    """The request fields of ``case`` (the same names as the CLI flags)."""
    taesd = os.path.join(args.model_dir, "taesd-random")
    paper = {"sync": "syncdiffusion"}
    return {
        "multidiffusion": {},
        "paper-exact": paper,
        "paper-first": {**paper, "sync_steps": args.first_steps},
        "taesd": {**paper, "sync_decoder": taesd},
        "reuse-eps": {**paper, "sync_reuse_eps": True},
        "loss-size": {**paper, "sync_loss_size": args.loss_size},
        "checkpointing": {**paper, "sync_checkpointing": True},
        "best": {**paper, "sync_decoder": taesd, "sync_reuse_eps": True, "sync_loss_size": args.loss_size,
                 "sync_steps": args.best_steps},
    }[case]


class RowCounter:
    """Counts rows (samples) through the UNet, the VAE decoder, the tiny decoder and the LPIPS network,
    split by whether autograd was on, with one global forward pre-hook while ``counting`` is set."""

    def __init__(self, loss_size: int):
        import lpips
        import torch
        from diffusers import UNet2DConditionModel
        from diffusers.models.autoencoders.vae import Decoder, DecoderTiny

        self.kinds = {UNet2DConditionModel: "unet", Decoder: "vae_decoder", DecoderTiny: "tiny_decoder", lpips.LPIPS: "lpips"}
        self.rows: dict[str, int] = {}
        self.counting = False
        self.checkpointing = False
        self.loss_size = loss_size  # LPIPS rows of this side are counted apart (--sync-loss-size)
        self._torch = torch
        torch.nn.modules.module.register_module_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        kind = self.kinds.get(type(module))
        if kind is None or not self.counting:
            return
        if not self._torch.is_grad_enabled():
            key = f"{kind}_forward"
        elif kind == "lpips":  # called with (images, anchor images): one pair per row
            key = "lpips_grad_small" if inputs[0].shape[-1] == self.loss_size else "lpips_grad"
        else:
            key = f"{kind}_grad_checkpointed" if self.checkpointing else f"{kind}_grad"
        self.rows[key] = self.rows.get(key, 0) + inputs[0].shape[0]


def case_generate(args) -> dict:
    """One case: the engine's denoising stage with the case's settings, the decode, Intra-LPIPS."""
    import numpy as np

    from backend.engine.decode import decode_canvas
    from backend.engine.models import ModelCache
    from backend.app.job import check_request
    from backend.engine.generation import denoise
    from backend.analysis.metrics import intra_lpips, non_overlapping_crops
    from backend.products.images import to_uint8
    from backend.engine.perceptual import load_perceptual_loss
    from backend.request import GenerateRequest

    settings = sync_settings(args, args.case)
    request = GenerateRequest(
        prompt=args.prompt, layout="wide", width=args.width, height=args.height, steps=args.steps,
        guidance=args.guidance, seed=args.seed, window=args.window, stride=args.stride, view_batch=args.view_batch,
        model=args.model_dir, device=args.device, dtype=args.dtype,
        out=os.path.join(os.path.dirname(args.result), "unused-out"), **settings,
    )
    checked = check_request(request)
    memory, clock = PeakMemory(checked.device), Clock(checked.device)
    model = ModelCache().get(checked)
    memory.loaded()
    counter = RowCounter(args.loss_size)
    counter.checkpointing = request.sync_checkpointing
    stamps = []

    def report(stage, step, total, preview):
        stamps.append(clock())
        log(args.case, f"step {step}/{total} at {stamps[-1] - began:.1f} s")

    began = clock()
    counter.counting = True
    latents, canvas, details = denoise(checked.resolved_for(model), model, report)
    counter.counting = False
    denoise_s = clock() - began
    began_decode = clock()
    image = decode_canvas(model.pipeline.vae, latents, canvas)[0].permute(1, 2, 0).numpy()
    decode_s = clock() - began_decode
    sync = details.get("syncdiffusion", {})
    # Coherence of the result, with the guidance's own loss network (LPIPS-VGG, same trunk choice).
    loss = load_perceptual_loss("lpips-vgg", model.device, "auto")
    # Crops half the height: a short CPU canvas still gives several pairs (384x256 px: 6 crops, 15 pairs).
    crops = non_overlapping_crops(to_uint8(image), image.shape[0] // 2)
    return {
        "views": details["views"], "guided_steps": sync.get("guided_steps", 0), "settings": settings,
        "denoise_s": denoise_s, "decode_s": decode_s, "step_s": [b - a for a, b in zip([began] + stamps, stamps)],
        "rows": counter.rows, "memory": memory.result(), "intra_lpips": intra_lpips(crops, loss) if len(crops) > 1 else float("nan"),
        "loss_backbone": loss.backbone.describe(),
    }


def case_flops(args) -> dict:
    """Floating-point operations per row of each network at this benchmark's sizes, on the meta device."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from bench_multidiffusion import SD_VAE
    from backend.engine.perceptual import load_perceptual_loss

    def count(run) -> int:
        mode = FlopCounterMode(display=False)
        with mode:
            run()
        return mode.get_total_flops()

    def forward_and_input_gradient(network, make_input):
        def run():
            inputs = make_input().requires_grad_(True)
            network(inputs).sum().backward()
        return count(run)

    side, pixels = args.window, args.window * 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_UNET).requires_grad_(False)
        vae = AutoencoderKL(**SD_VAE).requires_grad_(False)
        tiny = AutoencoderTiny().requires_grad_(False)
    text = torch.empty(1, 77, SD2_UNET["cross_attention_dim"], device="meta")
    timestep = torch.tensor(500, device="meta")

    def latent():
        return torch.empty(1, 4, side, side, device="meta")

    def unet_row(x):
        return unet(x, timestep, encoder_hidden_states=text).sample

    per_row = {}
    with torch.no_grad():
        per_row["unet_forward"] = count(lambda: unet_row(latent()))
        per_row["vae_decoder_forward"] = count(lambda: vae.decoder(latent()))
        per_row["tiny_decoder_forward"] = count(lambda: tiny.decoder(latent()))
    per_row["unet_grad"] = forward_and_input_gradient(unet_row, latent)
    per_row["vae_decoder_grad"] = forward_and_input_gradient(vae.decoder, latent)
    per_row["tiny_decoder_grad"] = forward_and_input_gradient(tiny.decoder, latent)
    for network in (unet, vae, tiny):
        network.enable_gradient_checkpointing()
    per_row["unet_grad_checkpointed"] = forward_and_input_gradient(unet_row, latent)
    per_row["vae_decoder_grad_checkpointed"] = forward_and_input_gradient(vae.decoder, latent)
    per_row["tiny_decoder_grad_checkpointed"] = forward_and_input_gradient(tiny.decoder, latent)
    # The LPIPS row of a case runs at the size its images have: the full view, or --loss-size.
    lpips = load_perceptual_loss("lpips-vgg", "cpu", "random").network.to("meta")
    anchor = torch.empty(1, 3, pixels, pixels, device="meta")
    per_row["lpips_grad"] = forward_and_input_gradient(lambda x: lpips(x, anchor), lambda: torch.empty(1, 3, pixels, pixels, device="meta"))
    small = torch.empty(1, 3, args.loss_size, args.loss_size, device="meta")
    per_row["lpips_grad_small"] = forward_and_input_gradient(lambda x: lpips(x, small), lambda: torch.empty(1, 3, args.loss_size, args.loss_size, device="meta"))
    return {"per_row": per_row, "machine": machine_info(args)}


if __name__ == "__main__":
    main()
