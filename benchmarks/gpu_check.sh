#!/usr/bin/env bash
# The device check of the GPU path (issue 17, item 6), one script for one H100/H200: SD2-base architecture with
# random weights in float16, a 2048x1024 world, a 2048x512 wide panorama and a 512x512 tile with each schedule at
# 50 DDIM and 4 LCM steps, our MultiDiffusion against diffusers' panorama pipeline, and --compile twice; prints
# seconds per job, UNet rows per second and peak memory (benchmarks/gpu_check.py says what each column is).
# Under 8 minutes: no job starts after 400 s and the compile jobs not after 260 s; `timeout` is the backstop.
# Extra arguments go to gpu_check.py (e.g. --tiny to run it on the CPU with the tests' tiny model,
# --json gpu_check.json to keep the numbers). PYTHON picks the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout --signal=INT --kill-after=15 470 "$PYTHON" benchmarks/gpu_check.py --deadline-s 400 --compile-deadline-s 260 "$@"
