#!/usr/bin/env python3
"""Throw a fixed corpus of bad input at the stdio worker and count how it copes (Reliability, "Done when").

    python benchmarks/fuzz_worker.py --model TINY_MODEL_FOLDER [--count 300] [--repo DIR] [--json out.json]

The worker is ``python -m backend serve --stdio`` of the checkout ``--repo`` (default: this one), so the same
corpus measures an older commit too. Without ``--model`` a tiny random Stable Diffusion model is built first
(``tests/model_factory.py``; seconds, nothing downloaded).

The corpus (``random.Random(--seed)``, so every run sends the same bytes): fixed cases (deep nesting, UTF-16,
bytes that are not UTF-8, NUL, NaN and Infinity, 1e400, huge lines, lone surrogates in a job id and a model
path, a 1 MB value, a 5000-digit number), two cancel scenarios (a cancel sent before its job, a job id reused
after a cancel in the queue), then ``--count`` random cases: random bytes, random JSON, request-like objects,
mutated requests, and generate requests with a wrong type or value in one field. After each case a fence (a
generate the job thread refuses at once) marks its end: every answer of the case comes before the fence's. A
tiny real job runs every 50 cases and at the end.

Counts printed: inputs tried; worker crashes (the process exited; it is restarted); hangs (no answer within
``--timeout``; killed and restarted); wrong kinds (an answer that is not an error of kind bad_request, or
model_not_found for a generate's params: internal, done, ready…); missing and extra answers (each bad line
must get exactly one); unreadable event lines (not UTF-8 JSON); messages over 1000 characters; cancel
errors (a cancel that stopped a job sent after it, or stayed after its job); failed liveness jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LINE_LIMIT = 1 << 20  # docs/protocol.md
DEPTH_LIMIT = 64
OPS = ("hello", "generate", "cancel", "shutdown")
FIELDS = ("prompt", "negative_prompt", "layout", "width", "height", "steps", "guidance", "seed", "window", "stride",
          "view_batch", "scheduler", "model", "model_config", "lora", "lora_scale", "device", "dtype", "memory",
          "overwrite", "allow_pickle", "views", "fusion", "prompt_up", "prompt_down", "sync", "sync_weight",
          "sync_decay", "sync_steps", "sync_every", "sync_anchor", "sync_loss", "sync_loss_backbone",
          "sync_loss_size", "sync_decoder", "sync_reuse_eps", "sync_checkpointing", "mad_steps", "mad_blocks",
          "syncsde_lambda", "syncsde_compose", "syncsde_open_chain", "no_hdr", "exposure", "sun_ratio",
          "sun_strength", "sun_direction", "half", "out", "colour")
"""GenerateRequest's fields at the time of writing, plus two it refuses (``out``, an unknown name)."""
COUNTS = ("inputs tried", "worker crashes", "hangs", "wrong kinds", "missing answers", "extra answers",
          "unreadable event lines", "messages over 1000 chars", "cancel errors", "failed liveness jobs")


class WorkerGone(Exception):
    """The worker exited (``hang`` False) or did not answer in time (``hang`` True; it has been killed)."""

    def __init__(self, hang: bool):
        super().__init__("hang" if hang else "exit")
        self.hang = hang


class Worker:
    """A worker subprocess spoken to in bytes; stdout lines are read on a thread, stderr goes to ``log``."""

    def __init__(self, repo: str, log, timeout: float, counts: dict):
        self.timeout, self.counts = timeout, counts
        env = {**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--stdio"], cwd=repo, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.process.stdout:
            self.lines.put(raw)
        self.lines.put(None)

    def write(self, data: bytes) -> None:
        """Write ``data`` to stdin; raises WorkerGone when the worker exited or stopped reading."""
        failed = []

        def write():
            try:
                self.process.stdin.write(data)
                self.process.stdin.flush()
            except OSError:
                failed.append(True)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(self.timeout)
        if writer.is_alive():
            self.kill()
            raise WorkerGone(hang=True)
        if failed:
            raise WorkerGone(hang=False)

    def next_event(self) -> dict:
        """The next readable event (unreadable lines are counted and skipped); raises WorkerGone."""
        while True:
            try:
                raw = self.lines.get(timeout=self.timeout)
            except queue.Empty:
                self.kill()
                raise WorkerGone(hang=True) from None
            if raw is None:
                raise WorkerGone(hang=False)
            try:
                event = json.loads(raw.decode("utf-8"))
            except ValueError:
                self.counts["unreadable event lines"] += 1
                continue
            if isinstance(event, dict):
                return event
            self.counts["unreadable event lines"] += 1

    def kill(self) -> None:
        """Kill the worker and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# ----------------------------------------------------------------------------------------------------- the corpus


def tiny_params(model: str, **overrides) -> dict:
    """A tiny job (a second or two on a CPU)."""
    return {"prompt": "a harbour", "layout": "tile", "width": 128, "height": 128, "steps": 1, "window": 16,
            "stride": 8, "seed": 1, "device": "cpu", "model": model, **overrides}


def generate_line(job: str, params: dict, out_dir: str) -> bytes:
    """A generate request as ASCII JSON (non-finite floats as NaN/Infinity, lone surrogates as escapes)."""
    return json.dumps({"op": "generate", "job": job, "params": params, "out_dir": out_dir}).encode("ascii")


def random_json(rng: random.Random, depth: int = 0):
    """A random JSON value of any shape (NaN and Infinity included, as Python floats)."""
    kind = rng.randrange(9 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, 2**64, -10**30, rng.randrange(-10**6, 10**6)])
    if kind == 3:
        return rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5, 6):
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000), rng.randrange(0xD800, 0xE000),
                                        rng.randrange(0, 32)])) for _ in range(rng.randrange(12)))
    if kind == 7:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_json(rng, 3) if rng.random() < 0.8 else "op": random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _structure_ok(value, depth: int = 1) -> bool:
    if isinstance(value, str):
        return not any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, dict)):
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        return depth <= DEPTH_LIMIT and all(_structure_ok(item, depth + 1) for item in items)
    return True


def documented_verdict(line: bytes) -> str:
    """What docs/protocol.md makes of one line: "blank" (no answer), "bad" (one bad_request) or "valid"."""
    if not line.strip(b" \t\r"):
        return "blank"
    try:
        value = json.loads(line.decode("utf-8-sig")) if len(line) <= LINE_LIMIT else None
    except (ValueError, RecursionError):
        return "bad"
    if not isinstance(value, dict) or not _structure_ok(value) or value.get("op") not in OPS:
        return "bad"
    op, out_dir = value["op"], value.get("out_dir")
    if op in ("generate", "cancel") and not isinstance(value.get("job"), str):
        return "bad"
    if op == "generate" and not (isinstance(value.get("params"), dict) and isinstance(out_dir, str) and os.path.isabs(out_dir)):
        return "bad"
    return "valid"


def fixed_cases(model: str, out: str) -> list[tuple[str, bytes, int]]:
    """The named cases: (name, the line, how many answers it must get)."""
    hello = b'{"op":"hello"}'
    pad = b'{"op":"hello","pad":"'
    return [
        ("deep [ x100000", b"[" * 100_000, 1),
        ("deep [] x100000", b"[" * 100_000 + b"]" * 100_000, 1),
        ("hello nested 65 deep", b'{"op":"hello","x":' + b"[" * 64 + b"]" * 64 + b"}", 1),
        ("UTF-16 hello", hello.decode().encode("utf-16"), 1),
        ("UTF-16-LE hello", hello.decode().encode("utf-16-le"), 1),
        ("bytes ff fe", b"\xff\xfe garbage", 1),
        ("CESU surrogate bytes", b'{"op":"hello","x":"\xed\xa0\x80"}', 1),
        ("NUL", b"\x00", 1),
        ("form feed", b"\x0c", 1),
        ("BOM only", b"\xef\xbb\xbf", 1),
        ("hello NaN", b'{"op":"hello","x":NaN}', 1),
        ("hello Infinity", b'{"op":"hello","x":Infinity}', 1),
        ("cancel -Infinity", b'{"op":"cancel","job":"q","x":-Infinity}', 1),
        ("hello 1e400", b'{"op":"hello","x":1e400}', 1),
        ("hello 5000 digits", b'{"op":"hello","x":' + b"9" * 5000 + b"}", 1),
        ("hello 1 MiB + 1", pad + b"a" * (LINE_LIMIT + 1 - len(pad) - 2) + b'"}', 1),
        ("hello 16 MiB", pad + b"a" * (16 << 20) + b'"}', 1),
        ("op of 1 MB", json.dumps({"op": "x" * 1_000_000}).encode(), 1),
        ("hello lone surrogate", b'{"op":"hello","x":"\\udc80"}', 1),
        ("job id \\ud800x", generate_line("\ud800x", tiny_params(model), os.path.join(out, "s")), 1),
        ("model path caf\\udce9", generate_line("m", tiny_params(os.path.join(out, "caf\udce9", "model")), os.path.join(out, "m")), 1),
        ("generate NaN prompt", b'{"op":"generate","job":"n","params":{"prompt":NaN},"out_dir":"/tmp/n"}', 1),
        ("generate 100k-char field name", generate_line("k", {**tiny_params(model), "k" * 100_000: 1}, os.path.join(out, "k")), 1),
    ]


def random_line(rng: random.Random) -> tuple[str, bytes]:
    """One random line that is bad (the caller drops those the document calls valid or blank)."""
    kind = rng.randrange(6)
    if kind == 0:
        return "random bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"")
    if kind == 1:
        return "random JSON", json.dumps(random_json(rng)).encode("ascii")
    if kind == 2:
        request = {"op": rng.choice([*OPS, random_json(rng)])}
        for name in ("job", "params", "out_dir"):
            if rng.random() < 0.6:
                request[name] = rng.choice([random_json(rng), "/abs/out", {}])
        return "request-like", json.dumps(request).encode("ascii")
    if kind == 3:
        valid = rng.choice([b'{"op":"hello"}', b'{"op":"cancel","job":"c"}',
                            b'{"op":"generate","job":"g","params":{"prompt":"p"},"out_dir":"/tmp/g"}'])
        return "truncated request", valid[: rng.randrange(1, len(valid))]
    if kind == 4:
        depth = rng.choice([65, 100, 1000, 50_000])
        return "deep", b'{"op":"hello","x":' + b"[" * depth + b"]" * depth + b"}"
    token = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"\\ud83d"', b'"\\udfff"'])
    return "non-finite or surrogate", b'{"op":"hello","x":' + token + b"}"


LATE_FIELDS = ("model_config", "allow_pickle", "lora", "scheduler", "device", "dtype")
"""Fields read only once the model is found: half the time these get the real model (a value taken runs a job)."""


def random_params(rng: random.Random, missing_model: str, model: str, index: int) -> tuple[str, dict]:
    """A tiny job whose model is missing (or, for LATE_FIELDS, sometimes real) with one field, in turn, given a
    random value of a random type."""
    name = FIELDS[index % len(FIELDS)]
    context = rng.choice([{}, {"layout": "equirect", "width": 256, "height": 128}, {"sync": "syncdiffusion"}])
    real = name in LATE_FIELDS and rng.random() < 0.5
    if real:  # values of a wrong type only: a valid one (lora None, allow_pickle false) would run a real job
        value = rng.choice([[0, 0], {}, [], {"a": 1}, 1.5, -1] + (["true"] if name == "allow_pickle" else []))
    else:
        value = rng.choice([random_json(rng), [0, 0], {}, [], "caf\udce9", "true", 1.5, -1, True, None, [1e400, 0]])
    return f"params {name}={str(value)[:40]}", {**tiny_params(model if real else missing_model), **context, name: value}


# -------------------------------------------------------------------------------------------------------- running


class Fuzzer:
    """Runs cases against a worker, restarting it after a crash or hang, and keeps the counts."""

    def __init__(self, repo: str, model: str, out: str, timeout: float):
        self.repo, self.model, self.out, self.timeout = repo, model, out, timeout
        self.counts = dict.fromkeys(COUNTS, 0)
        self.log = open(os.path.join(out, "worker.log"), "ab")
        self.numbers = iter(range(10**9))
        self.worker = self._start()
        self.notes: list[str] = []

    def _start(self) -> Worker:
        return Worker(self.repo, self.log, self.timeout, self.counts)

    def _restart(self, gone: WorkerGone, name: str) -> None:
        self.counts["hangs" if gone.hang else "worker crashes"] += 1
        self.notes.append(f"{'hang' if gone.hang else 'crash'} after: {name}")
        self.worker.kill()
        self.worker = self._start()

    def case(self, name: str, data: bytes, expected: int, allowed=("bad_request",)) -> None:
        """Send ``data`` (lines) then a fence; check that exactly ``expected`` answers came, of kinds ``allowed``."""
        self.counts["inputs tried"] += 1
        fence = f"fence-{next(self.numbers)}"
        try:
            self.worker.write(data + b"\n" + generate_line(fence, {}, os.path.join(self.out, fence)) + b"\n")
            answers = []
            while not ((event := self.worker.next_event()).get("job") == fence and event.get("event") == "error"):
                if event.get("event") != "progress":
                    answers.append(event)
        except WorkerGone as gone:
            self._restart(gone, name)
            return
        self.counts["missing answers"] += max(0, expected - len(answers))
        self.counts["extra answers"] += max(0, len(answers) - expected)
        for event in answers:
            if event.get("event") != "error" or event.get("kind") not in allowed:
                self.counts["wrong kinds"] += 1
                self.notes.append(f"{name}: {event.get('event')} {event.get('kind', '')} {str(event.get('message', ''))[:120]}")
            if len(str(event.get("message", ""))) > 1000:
                self.counts["messages over 1000 chars"] += 1

    def job_ends(self, job: str, params: dict | None = None) -> str | None:
        """Send a generate with ``params`` (unless None: one already sent) and wait for the end of ``job``;
        returns "done", the error kind, or None when the worker died."""
        try:
            if params is not None:
                self.worker.write(generate_line(job, params, os.path.join(self.out, f"{job}-{next(self.numbers)}")) + b"\n")
            while not ((event := self.worker.next_event()).get("job") == job and event.get("event") in ("done", "error")):
                pass
        except WorkerGone as gone:
            self._restart(gone, f"job {job}")
            return None
        return event.get("kind", "done")

    def liveness(self) -> None:
        """A tiny real job must be done."""
        if self.job_ends("alive", tiny_params(self.model)) != "done":
            self.counts["failed liveness jobs"] += 1

    def cancel_scenarios(self) -> None:
        """A cancel sent before its job must not stop it; a job cancelled in the queue must not leave its
        cancel behind for the next job with its id."""
        self.counts["inputs tried"] += 2
        try:
            self.worker.write(b'{"op":"cancel","job":"early"}\n')
        except WorkerGone as gone:
            self._restart(gone, "stale cancel")
        if self.job_ends("early", tiny_params(self.model)) != "done":
            self.counts["cancel errors"] += 1
        try:
            blocker = generate_line("blocker", tiny_params(self.model, steps=500, width=512, height=128), os.path.join(self.out, "blocker"))
            self.worker.write(blocker + b"\n")
            while self.worker.next_event().get("stage") != "denoising":
                pass
            self.worker.write(generate_line("queued", tiny_params(self.model), os.path.join(self.out, "queued")) + b"\n"
                              + b'{"op":"cancel","job":"queued"}\n{"op":"cancel","job":"blocker"}\n')
        except WorkerGone as gone:
            self._restart(gone, "queued cancel")
        if self.job_ends("queued") != "cancelled" or self.job_ends("queued", tiny_params(self.model)) != "done":
            self.counts["cancel errors"] += 1


def run(args) -> dict:
    """Run the corpus; returns the counts (and the notes under "notes")."""
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-worker-") as out:
        model = args.model or build_model(out)
        fuzzer = Fuzzer(os.path.abspath(args.repo), model, out, args.timeout)
        started = time.monotonic()
        fuzzer.liveness()
        for name, data, expected in fixed_cases(model, out):
            fuzzer.case(name, data, expected)
        fuzzer.cancel_scenarios()
        for index in range(args.count):
            if index % 2:
                name, params = random_params(rng, os.path.join(out, "no-such-model"), model, index // 2)
                fuzzer.case(name, generate_line(f"p{index}", params, os.path.join(out, f"p{index}")), 1,
                            ("bad_request", "model_not_found"))
            else:
                name, line = random_line(rng)
                if documented_verdict(line) == "bad":
                    fuzzer.case(name, line, 1)
            if index % 50 == 49:
                fuzzer.liveness()
        fuzzer.liveness()
        fuzzer.worker.kill()
        fuzzer.log.close()
        return {**fuzzer.counts, "seconds": round(time.monotonic() - started, 1), "notes": fuzzer.notes}


def build_model(folder: str) -> str:
    """A tiny random Stable Diffusion model in ``folder`` (tests/model_factory.py)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from model_factory import save_random_sd_model

    return save_random_sd_model(os.path.join(folder, "tiny-sd"))


def main() -> int:
    """Parse the arguments, run the corpus, print the counts; exits 0 (the counts are the result)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a tiny diffusers model folder (default: build one)")
    parser.add_argument("--count", type=int, default=300, help="random cases after the fixed ones (default 300)")
    parser.add_argument("--repo", default=REPO, help="the checkout whose worker runs (default: this one)")
    parser.add_argument("--seed", type=int, default=0, help="the corpus's seed (default 0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer that make a hang")
    parser.add_argument("--notes", action="store_true", help="also print what each crash, hang and wrong kind followed")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args()
    result = run(args)
    print(f"worker of {os.path.abspath(args.repo)} (seed {args.seed}, {args.count} random cases, {result['seconds']} s)")
    for name in COUNTS:
        print(f"  {name:<26} {result[name]}")
    if args.notes:
        print("\n".join(f"  - {note}" for note in result["notes"]))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
