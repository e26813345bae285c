"""Throw a fixed list of hostile and careless command lines at ``python -m backend`` and count how each ends.

    python benchmarks/hostile_cli.py [--repo CHECKOUT] [--model TINY_MODEL_FOLDER]

Every input must end with exit code 0 (it was fine) or 2 (bad input: one sentence starting ``error:``, no
traceback, no output folder left behind). Counted as defects: tracebacks or exit 1 ("crash"), more than one
line on stderr, an output folder left behind by a refused job, and runs that do not end within the timeout
("hang"). ``--repo`` runs another checkout (e.g. an older commit in a ``git worktree``), so before/after
counts come from the same list. Needs only a tiny model (built with tests/model_factory.py when not given).
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300


def hostile_inputs(model: str, work: str) -> dict[str, list]:
    """{name: argv after ``python -m backend``} (bytes allowed in argv, as a shell passes them)."""
    regular_file = os.path.join(work, "a-file.txt")
    with open(regular_file, "w", encoding="utf-8") as file:
        file.write("not a folder")
    read_only = os.path.join(work, "read-only")
    os.makedirs(read_only, exist_ok=True)
    os.chmod(read_only, stat.S_IRUSR | stat.S_IXUSR)
    corrupt = os.path.join(work, "corrupt.safetensors")
    with open(corrupt, "wb") as file:
        file.write(os.urandom(4096))
    truncated = os.path.join(work, "truncated.safetensors")
    with open(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors"), "rb") as source:
        data = source.read()
    with open(truncated, "wb") as file:
        file.write(data[: len(data) // 3])
    empty_folder = os.path.join(work, "no-weights")
    os.makedirs(empty_folder, exist_ok=True)
    fast = ["--layout", "tile", "--width", "128", "--height", "128", "--steps", "1", "--window", "16",
            "--stride", "16", "--device", "cpu", "--model", model]

    def out(name):
        return ["--out", os.path.join(work, "out-" + name)]

    generate = ["generate", "--prompt", "a harbour"]
    cases = {
        "out under a regular file": [*generate, *fast, "--out", os.path.join(regular_file, "sub")],
        "out in a read-only folder": [*generate, *fast, "--out", os.path.join(read_only, "job")],
        "out with a 300-character name": [*generate, *fast, "--out", os.path.join(work, "n" * 300)],
        "corrupt --lora": [*generate, *fast, "--lora", corrupt, *out("lora")],
        "truncated --lora": [*generate, *fast, "--lora", truncated, *out("lora2")],
        "corrupt --model": [*generate, *[arg if arg != model else corrupt for arg in fast], *out("model")],
        "truncated --model": [*generate, *[arg if arg != model else truncated for arg in fast], *out("model2")],
        "model folder without weights": [*generate, *[arg if arg != model else empty_folder for arg in fast], *out("empty")],
        "prompt with byte 0xFF": ["generate", "--prompt", b"caf\xff", *fast, *out("prompt")],
        "scheduler of another family": [*generate, *fast, "--scheduler", "FlowMatchEulerDiscreteScheduler", *out("sched")],
        "scheduler missing a package": [*generate, *fast, "--scheduler", "DPMSolverSDEScheduler", *out("sched2")],
        "unknown scheduler": [*generate, *fast, "--scheduler", "NoSuchScheduler", *out("sched3")],
        "steps beyond the noise levels": [*generate, *fast, "--steps", "5000", *out("steps")],
        "nan seed": [*generate, *fast, "--seed", "nan", *out("seed")],
        "nan guidance": [*generate, *fast, "--guidance", "nan", *out("guidance")],
        "huge prompt": [*generate[:2], "x" * 100_000, *fast, *out("huge")],
        "sun direction off the sphere": [*generate, "--layout", "equirect", "--sun-direction", "0,1e400",
                                          "--model", model, "--device", "cpu", *out("sun")],
        "models download --help as an id": ["models", "download", "--", "--help"],
        "models download an option-like id": ["models", "download", "-x"],
        "out is an existing file": [*generate, *fast, "--out", regular_file],
    }
    return cases


def run_case(repo: str, argv: list) -> dict:
    """Run one input; returns {"code", "lines", "traceback", "hang"}."""
    env = {**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable.encode(), b"-m", b"backend"] + [arg if isinstance(arg, bytes) else arg.encode() for arg in argv]
    try:
        done = subprocess.run(command, capture_output=True, env=env, cwd=repo, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"code": None, "lines": 0, "traceback": False, "hang": True}
    error = done.stderr.decode("utf-8", "replace")
    lines = [line for line in error.splitlines() if line.startswith(("error:", "Traceback", "usage:"))]
    return {"code": done.returncode, "lines": len(lines), "traceback": "Traceback" in error, "hang": False,
            "last": (error.strip().splitlines() or [""])[-1][:160]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(HERE), help="the checkout to run (default: this one)")
    parser.add_argument("--model", help="a tiny diffusers model folder (default: built in a temporary folder)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="hostile-cli-")
    try:
        model = args.model
        if model is None:
            sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
            from model_factory import save_random_sd_model

            model = save_random_sd_model(os.path.join(work, "tiny-sd"))
        counts = {"inputs": 0, "crashes": 0, "hangs": 0, "not one sentence": 0, "folders left": 0}
        for name, argv in hostile_inputs(model, work).items():
            result = run_case(os.path.abspath(args.repo), argv)
            out = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--out"), None)
            left = result["code"] not in (0, None) and isinstance(out, str) and os.path.isdir(out) and "out-" in out
            counts["inputs"] += 1
            counts["crashes"] += result["traceback"] or result["code"] not in (0, 2, None)
            counts["hangs"] += result["hang"]
            counts["not one sentence"] += result["code"] == 2 and result["lines"] != 1
            counts["folders left"] += left
            print(f"{name:45s} exit {result['code']}  {'TRACEBACK ' if result['traceback'] else ''}{result.get('last', '')}")
        print(counts)
    finally:
        for root, folders, _ in os.walk(work):
            for folder in folders:
                os.chmod(os.path.join(root, folder), stat.S_IRWXU)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
