"""Choose the default view schedule (``--schedule``) of each layout by measurement.

For each layout (wide, equirect, tile) and each of several seeds, runs the product's engine
(``backend.app.job.check_request`` + ``run_job``, files written to a temporary folder) on the development
model ``/work/shared/models/toy-landscape`` (real, smooth content; 4 px per latent, 8-latent window) with DDIM
and guidance 7.5, once per schedule case:

| case | request |
|---|---|
| ``dense`` | ``--schedule dense``, default stride (window/8): today's MultiDiffusion |
| ``dense-half`` | ``--schedule dense --stride window/2`` |
| ``dense-3q`` | ``--schedule dense --stride 3·window/4`` (a quarter-window overlap) |
| ``shifted`` | ``--schedule shifted`` (SpotDiffusion) |
| ``shifted+sync`` | ``--schedule shifted --sync syncdiffusion --sync-steps K --sync-loss-backbone random`` |

Each image is measured with ``backend.analysis.metrics.measure`` (LPIPS-VGG and style trunks with random
weights from seed 0, as ``python -m backend metrics --backbone random``): Intra-LPIPS and Intra-Style-L
(equirect: also on the four horizon faces), the wrap seam ratios (equirect ±180°; tile both wraps), the
pole ratios and the largest cube-edge ratio (equirect); and its metadata.json gives the UNet rows, the
views per step and the denoising seconds. Printed per layout and case: mean ± standard error over seeds,
the UNet rows against dense, and the paired (same seed) differences against dense.

Decision rule (per layout): the default is the case with the fewest UNet rows whose every coherence
metric is no worse than dense's: mean paired difference (case − dense, higher = worse for every metric)
at most ``--tolerance`` (default 1) standard errors of that difference.

With ``--confirm-with EARLIER.json``, a metric counts as worse only when the difference also points the same
way (worse than dense on average) in that earlier, independent run of the layout: with four or eight metrics
tested at one standard error each, a case truly equal to dense fails at least one about half the time or
more, while a real difference shows in both runs.

    python benchmarks/bench_schedules.py [--seeds 16] [--steps 30] [--layouts wide,equirect,tile] [--json FILE]
    python benchmarks/bench_schedules.py --report A.json B.json   # one table of runs split by --first-seed

A long run can be split over processes or sessions with ``--first-seed``; ``--report`` with several files
merges their seeds (same settings otherwise, no seed twice) into one table.

Timings: the machine's CPUs may be shared; torch runs ``--threads`` threads (default 1: with 2 threads on
a busy 2-core machine a step can take ten times as long), so seconds are indicative and UNet rows are the
cost that decides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
os.environ["HF_HUB_OFFLINE"] = "1"

DEFAULT_MODEL = "/work/shared/models/toy-landscape"
LAYOUTS = ("wide", "equirect", "tile")
CASES = ("dense", "dense-half", "dense-3q", "shifted", "shifted+sync")
# The coherence metrics of each layout, keys of ``measure``'s result; higher is worse for every one.
LAYOUT_METRICS = {
    "wide": ("intra_lpips", "intra_style_l"),
    "equirect": ("intra_lpips", "intra_style_l", "horizon_faces_intra_lpips", "horizon_faces_intra_style_l",
                 "seam_ratio_x", "cube_edge_ratio_max", "pole_ratio_up", "pole_ratio_down"),
    "tile": ("intra_lpips", "intra_style_l", "seam_ratio_x", "seam_ratio_y"),
}
# The cases that a --schedule value selects without other options (a default can only be one of these).
PLAIN_SCHEDULES = ("dense", "shifted")
COST_KEYS = ("unet_rows", "views_per_step", "denoising_s")
SHORT_NAMES = {
    "intra_lpips": "Intra-LPIPS", "intra_style_l": "Intra-Style-L", "horizon_faces_intra_lpips": "faces LPIPS",
    "horizon_faces_intra_style_l": "faces Style-L", "seam_ratio_x": "seam x", "seam_ratio_y": "seam y",
    "cube_edge_ratio_max": "cube edge max", "pole_ratio_up": "pole up", "pole_ratio_down": "pole down",
    "unet_rows": "UNet rows", "views_per_step": "views/step", "denoising_s": "denoise s",
}


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (px) -> (width, height); raises argparse.ArgumentTypeError otherwise."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in px, not {text!r}") from None
    return width, height


def case_fields(case: str, window: int, sync_steps: int, sync_weight: float) -> dict:
    """The ``GenerateRequest`` fields that make schedule case ``case`` (one of CASES) for a model whose window
    is ``window`` latents; ``sync_steps`` and ``sync_weight`` are SyncDiffusion's for ``shifted+sync``."""
    if case == "dense":
        return {"schedule": "dense"}
    if case == "dense-half":
        return {"schedule": "dense", "stride": max(1, window // 2)}
    if case == "dense-3q":
        return {"schedule": "dense", "stride": max(1, window * 3 // 4)}
    if case == "shifted":
        return {"schedule": "shifted"}
    if case == "shifted+sync":
        return {"schedule": "shifted", "sync": "syncdiffusion", "sync_steps": sync_steps, "sync_weight": sync_weight,
                "sync_loss_backbone": "random"}
    raise ValueError(f"unknown case {case!r}")


def model_window(model: str) -> int:
    """The UNet window (sample size, latents) of the diffusers folder or checkpoint ``model``, from its configs."""
    from backend.engine.models import read_model_geometry, read_unet_config, resolve_model_source

    source = resolve_model_source(model)
    return read_model_geometry(source, read_unet_config(source)).sample_size


def run_case(request_fields: dict, losses: dict, cache) -> dict:
    """Generate one image with the request ``request_fields`` (``GenerateRequest`` fields, ``out`` included)
    through ``check_request`` + ``run_job`` (model from ``cache``, a ModelCache), measure it with ``measure``
    (``losses`` from ``load_losses``) and delete its folder. Returns {metric: value (None -> inf), cost key:
    value, "wall_s": seconds of the job}."""
    import torch

    from backend.analysis.metrics import measure, read_image
    from backend.app.job import check_request, run_job
    from backend.request import GenerateRequest

    torch.manual_seed(0)  # nothing should draw from the global generator; if anything does, it repeats
    began = time.perf_counter()
    outputs = run_job(check_request(GenerateRequest(**request_fields)), models=cache)
    wall = time.perf_counter() - began
    with open(outputs["metadata"]) as f:
        metadata = json.load(f)
    measured = measure(read_image(outputs["png"]), request_fields["layout"], losses=losses)
    shutil.rmtree(request_fields["out"])
    row = {key: (math.inf if value is None else value) for key, value in measured.items()
           if key in LAYOUT_METRICS[request_fields["layout"]]}
    row.update(unet_rows=metadata["unet_rows"], views_per_step=metadata["views_per_step"]["mean"],
               denoising_s=metadata["timings"]["denoising_s"], wall_s=wall)
    return row


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``values``; the error is NaN for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(value) for value in values):
        return mean, math.nan
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def summarise(runs: dict[str, list[dict]], metrics: tuple[str, ...]) -> dict:
    """Per case: mean and standard error of every metric and cost over seeds, UNet rows as a multiple of
    dense's, and each metric's paired difference against dense (case − dense, seed by seed) as mean and
    standard error. ``runs``: case -> rows of ``run_case`` in seed order (dense included). Returns
    {case: {"mean": {key: [mean, se]}, "rows_vs_dense": float, "difference": {metric: [mean, se]}}}."""
    dense = runs["dense"]
    dense_rows = statistics.fmean(row["unet_rows"] for row in dense)
    summary = {}
    for case, rows in runs.items():
        keys = metrics + COST_KEYS
        summary[case] = {
            "mean": {key: list(mean_and_error([row[key] for row in rows])) for key in keys},
            "rows_vs_dense": statistics.fmean(row["unet_rows"] for row in rows) / dense_rows,
            "difference": {metric: list(mean_and_error([row[metric] - base[metric] for row, base in zip(rows, dense)]))
                           for metric in metrics},
        }
    return summary


def no_worse(difference: tuple[float, float], tolerance: float) -> bool:
    """Whether a paired difference (mean, standard error) of a higher-is-worse metric is within ``tolerance``
    standard errors of no change: mean <= tolerance x error (an error of NaN, one seed, allows only <= 0)."""
    mean, error = difference
    return mean <= tolerance * (error if math.isfinite(error) else 0.0)


def worse_on(summary: dict, case: str, metric: str, tolerance: float, earlier: dict | None = None) -> bool:
    """Whether ``case`` is worse than dense on ``metric`` in ``summary``: it fails ``no_worse`` there and, when an
    ``earlier`` summary of the same layout is given, its paired difference there was positive too (a case the
    earlier run did not have counts as confirmed)."""
    if no_worse(summary[case]["difference"][metric], tolerance):
        return False
    return earlier is None or case not in earlier or earlier[case]["difference"][metric][0] > 0


def decide(summary: dict, metrics: tuple[str, ...], tolerance: float, earlier: dict | None = None) -> dict:
    """The decision rule: among the cases of ``summary`` (from ``summarise``), by fewest mean UNet rows first,
    the first not ``worse_on`` any metric (``earlier``: the summary of an earlier run that must confirm a
    difference; dense always passes). Returns {"case": that case,
    "schedule": the ``--schedule`` value its rule supports as the layout's default (the cheapest passing case
    that ``--schedule`` alone selects: dense or shifted), "why": sentences, "worse": {case: [metrics that
    failed]} for every case cheaper than the chosen one}."""
    by_cost = sorted(summary, key=lambda case: summary[case]["mean"]["unet_rows"][0])
    failures = {case: [metric for metric in metrics if worse_on(summary, case, metric, tolerance, earlier)]
                for case in by_cost}
    case = next(name for name in by_cost if not failures[name])
    schedule = next(name for name in by_cost if name in PLAIN_SCHEDULES and not failures[name])
    worse = {name: failures[name] for name in by_cost[:by_cost.index(case)]}
    rejected = "; ".join(f"{name} is worse in {', '.join(SHORT_NAMES[m] for m in failed)}" for name, failed in worse.items())
    confirmed = " and in the earlier run" if earlier is not None else ""
    if case == "dense":
        why = f"dense: every cheaper case is worse than dense beyond {tolerance:g} SE{confirmed} ({rejected})."
    else:
        why = (f"{case}: {summary[case]['rows_vs_dense']:.3f}x dense's UNet rows, and no coherence metric worse than "
               f"dense's by more than {tolerance:g} SE of the paired difference{confirmed}"
               + (f" ({rejected})" if rejected else "") + ".")
    if schedule != case:
        why += f" As a --schedule default: {schedule} ({case} is not a --schedule value alone)."
    return {"case": case, "schedule": schedule, "why": why, "worse": worse}


def number(value: float, digits: int = 4) -> str:
    """A short printed form of ``value`` with ``digits`` significant digits (scientific notation when tiny);
    "–" for NaN (no error from one seed)."""
    if not math.isfinite(value):
        return "–" if math.isnan(value) else "inf"
    return f"{value:.{digits - 1}e}" if value != 0 and abs(value) < 1e-3 else f"{value:.{digits}g}"


def markdown_tables(layout: str, summary: dict, metrics: tuple[str, ...], decision: dict, tolerance: float,
                    earlier: dict | None = None) -> str:
    """Two markdown tables for one layout: means ± standard error per case (costs and metrics), then the
    paired differences against dense (✓ within the tolerance, ✗ worse; with an ``earlier`` summary, "(✗ not in
    the earlier run)" where it did not confirm, and that run's difference beside each); and the decision line."""
    head = ["schedule", "views/step", "UNet rows", "rows × dense", "denoise s"] + [SHORT_NAMES[m] for m in metrics]
    lines = [f"**{layout}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, numbers in summary.items():
        mean = numbers["mean"]
        cells = [case, f"{mean['views_per_step'][0]:.1f}", f"{mean['unet_rows'][0]:.0f}", f"{numbers['rows_vs_dense']:.3f}",
                 f"{mean['denoising_s'][0]:.1f} ± {number(mean['denoising_s'][1], 2)}"]
        cells += [f"{number(mean[m][0])} ± {number(mean[m][1], 2)}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"paired difference vs dense (mean ± SE; ✓: at most {tolerance:g} SE worse)", "",
              "| schedule | " + " | ".join(SHORT_NAMES[m] for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for case, numbers in summary.items():
        if case == "dense":
            continue
        cells = []
        for metric in metrics:
            mean, error = numbers["difference"][metric]
            if no_worse((mean, error), tolerance):
                mark = "✓"
            else:
                mark = "✗" if worse_on(summary, case, metric, tolerance, earlier) else "(✗ not in the earlier run)"
            if earlier is not None and case in earlier:
                before = earlier[case]["difference"][metric][0]
                mark += f" [earlier {'+' if before >= 0 else ''}{number(before, 2)}]"
            cells.append(f"{'+' if mean >= 0 else ''}{number(mean, 3)} ± {number(error, 2)} {mark}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", f"decision ({layout}): {decision['why']}", ""]
    return "\n".join(lines)


def measure_layouts(args, cases: list[str], layouts: list[str]) -> dict:
    """Generate and measure every (layout, seed, case) of the parsed command line ``args``; progress lines go to
    stderr. Returns the report ``--json`` writes: {"settings": {...}, "layouts": {layout: {"size": [w, h],
    "runs": {case: [``run_case`` rows in seed order]}}}, "wall_s": seconds}."""
    import torch

    from backend.analysis.metrics import load_losses
    from backend.engine.models import ModelCache

    torch.set_num_threads(args.threads)
    window = model_window(args.model)
    sync_steps = args.sync_steps if args.sync_steps is not None else max(1, args.steps // 5)
    sizes = {"wide": args.wide_size, "equirect": (args.equirect_width, args.equirect_width // 2), "tile": args.tile_size}
    losses = load_losses("random")
    cache = ModelCache()
    began = time.perf_counter()
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "report")}
    report = {"settings": {**settings, "window": window, "sync_steps": sync_steps, "cases": cases, "device": "cpu",
                           "dtype": "float32", "torch_threads": torch.get_num_threads()}, "layouts": {},
              "seeds": list(range(args.first_seed, args.first_seed + args.seeds))}
    print(f"{args.model}: window {window} latents; {args.steps} DDIM steps, guidance 7.5, prompt {args.prompt!r}, seeds "
          f"{args.first_seed}..{args.first_seed + args.seeds - 1}; shifted+sync: SyncDiffusion w {args.sync_weight:g}, decay 0.95, first {sync_steps} steps, "
          f"LPIPS-VGG random trunk; {args.threads} torch thread(s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for layout in layouts:
            width, height = sizes[layout]
            runs = {case: [] for case in cases}
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for case in cases:
                    fields = dict(prompt=args.prompt, layout=layout, width=width, height=height, steps=args.steps,
                                  guidance=7.5, seed=seed, scheduler="ddim", view_batch=args.view_batch, model=args.model,
                                  device="cpu", no_hdr=True, out=os.path.join(folder, f"{layout}-{case}-{seed}"),
                                  **case_fields(case, window, sync_steps, args.sync_weight))
                    row = run_case(fields, losses, cache)
                    runs[case].append(row)
                    print(f"[{time.perf_counter() - began:7.0f} s] {layout} {width}x{height} seed {seed} {case}: "
                          f"{row['unet_rows']} rows, {row['denoising_s']:.1f} s, "
                          + ", ".join(f"{SHORT_NAMES[m]} {number(row[m])}" for m in LAYOUT_METRICS[layout]),
                          file=sys.stderr, flush=True)
            report["layouts"][layout] = {"size": [width, height], "runs": runs}
    report["wall_s"] = time.perf_counter() - began
    return report


def report_seeds(report: dict) -> list[int]:
    """The seeds of a report, in the order of its runs (files written before ``--first-seed`` existed: 1..N)."""
    return report.get("seeds") or list(range(1, report["settings"]["seeds"] + 1))


def seed_ranges(seeds: list[int]) -> str:
    """``seeds`` as comma-separated ranges, e.g. "1..32, 40"."""
    ranges: list[list[int]] = []
    for seed in seeds:
        if ranges and seed == ranges[-1][1] + 1:
            ranges[-1][1] = seed
        else:
            ranges.append([seed, seed])
    return ", ".join(f"{first}..{last}" if first != last else f"{first}" for first, last in ranges)


def merge_reports(reports: list[dict]) -> dict:
    """One report of several ``--json`` files of the same settings (apart from seeds) and cases: each layout's
    runs concatenated in file order, paired seed by seed as before. Raises ValueError with one sentence when the
    settings differ or a seed appears twice."""
    ignored = ("seeds", "first_seed", "json", "report", "layouts", "wall_s")
    first = reports[0]
    same = {key: value for key, value in first["settings"].items() if key not in ignored}
    seeds: list[int] = []
    merged = {"settings": dict(first["settings"]), "layouts": {}, "wall_s": 0.0, "seeds": seeds}
    for report in reports:
        other = {key: value for key, value in report["settings"].items() if key not in ignored}
        if other != same:
            differing = sorted(key for key in set(same) | set(other) if same.get(key) != other.get(key))
            raise ValueError(f"These reports differ in {', '.join(differing)}: only runs of the same settings merge.")
        twice = set(seeds) & set(report_seeds(report))
        if twice:
            raise ValueError(f"Seed {min(twice)} is in more than one report.")
        seeds += report_seeds(report)
        merged["wall_s"] += report["wall_s"]
        for layout, result in report["layouts"].items():
            into = merged["layouts"].setdefault(layout, {"size": result["size"], "runs": {case: [] for case in result["runs"]}})
            if into["size"] != result["size"] or set(into["runs"]) != set(result["runs"]):
                raise ValueError(f"The {layout} runs differ in size or cases between these reports.")
            for case, rows in result["runs"].items():
                into["runs"][case] += rows
    return merged


def print_report(report: dict, tolerance: float, earlier: dict | None = None) -> None:
    """Add each layout's ``summary`` and ``decision`` (``summarise``, ``decide`` at ``tolerance``) to ``report``
    (from ``measure_layouts`` or a ``--json`` file) and print the markdown tables, the rule and the decisions.
    ``earlier``: {layout: an earlier report's layout entry} (``--confirm-with``) whose differences must confirm."""
    earlier = earlier or {}
    settings = report["settings"]
    print(f"{settings['model']}: {settings['steps']} DDIM steps, guidance 7.5, prompt {settings['prompt']!r}, seeds "
          f"{seed_ranges(report_seeds(report))}, view batch {settings['view_batch']}; shifted+sync: SyncDiffusion w "
          f"{settings['sync_weight']:g}, decay 0.95, first {settings['sync_steps']} steps, LPIPS-VGG random trunk; CPU, "
          f"float32, {settings['torch_threads']} torch thread(s); mean ± standard error over seeds\n")
    for layout, result in report["layouts"].items():
        metrics = LAYOUT_METRICS[layout]
        result["summary"] = summarise(result["runs"], metrics)
        confirm = summarise(earlier[layout]["runs"], metrics) if layout in earlier else None
        result["decision"] = decide(result["summary"], metrics, tolerance, confirm)
        width, height = result["size"]
        print(markdown_tables(f"{layout} {width}x{height}", result["summary"], metrics, result["decision"], tolerance,
                              confirm))
    print("Decision rule: per layout, the case with the fewest UNet rows whose every coherence metric "
          "(Intra-LPIPS, Intra-Style-L; equirect also on the horizon faces, the ±180° seam, the largest cube-edge "
          f"ratio and both pole ratios; tile both wrap seams) is no worse than dense's by more than {tolerance:g} "
          "standard error(s) of the paired per-seed difference (higher is worse for every one)"
          + (f", confirmed by a positive difference in the earlier run of {', '.join(earlier)}" if earlier else "") + ".")
    for layout, result in report["layouts"].items():
        print(f"- {layout}: {result['decision']['why']}")
    print(f"wall time {report['wall_s']:.0f} s")


def main(argv=None) -> int:
    """Run the benchmark (see the module docstring), or re-print a saved one (``--report``); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16, help="seeds 1..N per layout and case (default 16)")
    parser.add_argument("--first-seed", type=int, default=1, help="the first seed (default 1): seeds first..first+N-1")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30: 16 seeds of dense at 50 steps take "
                        "over half an hour on a shared 2-core CPU)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated layouts (default: all three)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all; dense is always run)")
    parser.add_argument("--prompt", default="landscape", help="prompt (default 'landscape': ambiguous, so incoherent "
                        "images mix skies and grounds)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder (default {DEFAULT_MODEL})")
    parser.add_argument("--wide-size", type=parse_size, default=(256, 32), help="wide size WxH px (default 256x32)")
    parser.add_argument("--equirect-width", type=int, default=128, help="equirect width px; height = width/2 (default 128)")
    parser.add_argument("--tile-size", type=parse_size, default=(64, 64), help="tile size WxH px (default 64x64)")
    parser.add_argument("--view-batch", type=int, default=64, help="views per UNet call (default 64)")
    parser.add_argument("--sync-steps", type=int, help="SyncDiffusion's guided first steps (default steps/5, the paper's 10 of 50)")
    parser.add_argument("--sync-weight", type=float, default=20.0, help="SyncDiffusion's w (default 20, the paper's)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="standard errors of the paired difference a "
                        "case may be worse than dense by (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the docstring)")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--report", metavar="FILE", nargs="+", help="generate nothing: print the tables and decisions "
                        "of --json files written earlier (several: their seeds merged), with this --tolerance")
    parser.add_argument("--confirm-with", metavar="FILE", nargs="+", default=[], help="--json files of an earlier, "
                        "independent run: a metric counts as worse only when it was worse on average there too "
                        "(each layout from the one file that has it)")
    args = parser.parse_args(argv)
    earlier = {}
    for path in args.confirm_with:
        with open(path) as f:
            for layout, result in json.load(f)["layouts"].items():
                if layout in earlier:
                    parser.error(f"The layout {layout} is in more than one --confirm-with file.")
                earlier[layout] = result
    if args.report:
        reports = []
        for path in args.report:
            with open(path) as f:
                reports.append(json.load(f))
        try:
            report = merge_reports(reports)
        except ValueError as error:
            parser.error(str(error))
    else:
        layouts = args.layouts.split(",")
        cases = ["dense"] + [case for case in args.cases.split(",") if case != "dense"]
        for name, values, allowed in (("layout", layouts, LAYOUTS), ("case", cases, CASES)):
            unknown = [value for value in values if value not in allowed]
            if unknown:
                parser.error(f"unknown {name} {unknown[0]!r}; choose from {', '.join(allowed)}")
        report = measure_layouts(args, cases, layouts)
    print_report(report, args.tolerance, earlier)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
