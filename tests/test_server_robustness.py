"""The stdio worker against hostile input (docs/protocol.md, "Lines the backend refuses"): bytes that are not
UTF-8, lines too long or too deep, lone surrogates, non-finite numbers, stale cancels, huge values echoed in
messages; then property-based fuzzing (hypothesis) of one worker with random bytes, random JSON of every shape
and random generate params. After every bad line the worker is alive, answers it with exactly one
``bad_request`` event, and still runs a real job.

Every worker here is the real ``python -m backend serve --stdio`` subprocess, spoken to in bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import queue
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from backend import protocol
from backend.request import GenerateRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for one answer: generous, a loaded machine only makes answers slower
LINE_LIMIT = 1 << 20  # docs/protocol.md: a line is at most 1 MiB without its newline
DEPTH_LIMIT = 64  # docs/protocol.md: at most 64 nested arrays or objects
REQUEST_OPS = ("hello", "generate", "cancel", "fetch", "shutdown")
HELLO = b'{"op":"hello"}\n'


class ByteWorker:
    """A real ``python -m backend serve --stdio`` subprocess: bytes in, events out (every stdout line must be
    UTF-8 JSON), stderr appended to ``log_path``. A write or a wait longer than TIMEOUT is a hang: the worker
    is killed and the test fails, so no test here can block forever."""

    def __init__(self, log_path):
        self.log_path = str(log_path)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backend", "serve", "--stdio"], cwd=REPO, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"},
            )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.process.stdout:
            self.lines.put(raw)
        self.lines.put(None)

    def write(self, data: bytes) -> None:
        """Write ``data`` to the worker's stdin and flush; fails the test when the worker is gone or stops reading."""
        errors = []

        def write():
            try:
                self.process.stdin.write(data)
                self.process.stdin.flush()
            except OSError as error:
                errors.append(error)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(TIMEOUT)
        if writer.is_alive():
            self.process.kill()
            raise AssertionError(f"The worker stopped reading its input for {TIMEOUT} s (a hang).{self._log_tail()}")
        if errors:
            raise AssertionError(f"The worker is gone ({errors[0]}; exit code {self.process.wait()}).{self._log_tail()}")

    def send(self, message: dict) -> None:
        """Write one request (a dict, written as ASCII JSON) as a line."""
        self.write(json.dumps(message).encode("ascii") + b"\n")

    def next_event(self) -> dict:
        """The next event; fails the test when the worker exits, hangs, or writes a line that is not UTF-8 JSON."""
        try:
            raw = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            self.process.kill()
            raise AssertionError(f"No event within {TIMEOUT} s (a hang).{self._log_tail()}") from None
        if raw is None:
            raise AssertionError(f"The worker exited with code {self.process.wait()}.{self._log_tail()}")
        event = json.loads(raw.decode("utf-8"))  # strict: an event line that is not UTF-8 fails here
        assert isinstance(event, dict) and isinstance(event.get("event"), str), raw[:200]
        return event

    def until(self, predicate) -> list[dict]:
        """Events up to and including the first that satisfies ``predicate``."""
        events = []
        while not events or not predicate(events[-1]):
            events.append(self.next_event())
        return events

    def answers_before_ready(self) -> list[dict]:
        """Send hello and return the events that came before its ready event (the main thread answers in order)."""
        self.write(HELLO)
        return self.until(lambda event: event["event"] == "ready")[:-1]

    def close(self) -> None:
        """Kill the worker (if it runs) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _log_tail(self) -> str:
        with open(self.log_path, "rb") as log:
            return "\nWorker log (tail):\n" + log.read()[-3000:].decode("utf-8", "replace")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The module's worker, shared by its tests: starting one (torch, the model) costs seconds."""
    shared = {"worker": None, "folder": tmp_path_factory.mktemp("worker"), "started": itertools.count()}
    yield shared
    if shared["worker"] is not None:
        shared["worker"].close()


@pytest.fixture
def worker(workers, request):
    """A live worker with nothing pending: the module's, or a fresh one when it has exited or a test failed
    with it (its state is then unknown), so one failure does not fail the tests after it."""
    current = workers["worker"]
    if current is None or current.process.poll() is not None:
        if current is not None:
            current.close()
        current = workers["worker"] = ByteWorker(workers["folder"] / f"worker{next(workers['started'])}.log")
    failed = request.session.testsfailed
    yield current
    if request.session.testsfailed > failed:
        current.close()
        workers["worker"] = None


def params(tiny_model, **overrides):
    """A tiny job that runs in a second or two on a CPU (as tests/test_server.py's)."""
    return {"prompt": "a harbour", "layout": "tile", "width": 128, "height": 128, "steps": 2, "window": 16,
            "stride": 8, "seed": 1, "device": "cpu", "model": tiny_model, **overrides}


def run_tiny_job(worker, tiny_model, out_dir, job) -> None:
    """Send one valid tiny job and check that it is done: the worker still works."""
    worker.send({"op": "generate", "job": job, "params": params(tiny_model), "out_dir": str(out_dir)})
    end = worker.until(lambda event: event["event"] in ("done", "error") and event["job"] == job)[-1]
    assert end["event"] == "done", end


def _short(value, limit=2000) -> str:
    """A failure message's repr of ``value``, cut (this file's own, so it runs against any protocol.py)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def error_kinds(events) -> list[str]:
    """The kind of each event, "not an error" for the others."""
    return [event["kind"] if event["event"] == "error" else "not an error" for event in events]


# ------------------------------------------------------------------------------------- the defects, one by one


def test_lone_surrogates_are_refused_with_the_job_id_and_jobs_still_run(worker, tiny_model, tmp_path):
    """Reliability #2: a lone surrogate (a JSON ``\\ud800`` escape) in a job id or a model path is answered
    with bad_request naming the job, in a UTF-8 line, and the job thread lives on."""
    request = json.dumps({"op": "generate", "job": "\ud800x", "params": params(tiny_model), "out_dir": str(tmp_path / "s")})
    worker.write(request.encode("ascii") + b"\n")
    event = worker.until(lambda event: event["event"] == "error")[-1]
    assert (event["job"], event["kind"]) == ("\ud800x", "bad_request")
    assert event["message"] == "The line has text that is not valid Unicode (a lone surrogate)."

    model = os.path.join(str(tmp_path), "caf\udce9", "model")
    worker.send({"op": "generate", "job": "m", "params": params(model), "out_dir": str(tmp_path / "m")})
    event = worker.until(lambda event: event["event"] == "error")[-1]
    assert (event["job"], event["kind"]) == ("m", "bad_request")

    run_tiny_job(worker, tiny_model, tmp_path / "after", "after")
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


def test_events_always_encode_as_utf8():
    """Reliability #2: ``protocol.encode`` writes a string that has no UTF-8 form as its JSON escape."""
    line = protocol.encode(protocol.error_event("\ud800x", "bad_request", "caf\udce9."))
    assert json.loads(line.encode("utf-8")) == {"event": "error", "job": "\ud800x", "kind": "bad_request", "message": "caf\udce9."}
    assert protocol.encode({"prompt": "café ☀"}) == '{"prompt":"café ☀"}'  # text that has one stays as it is


def test_malformed_lines_get_one_bad_request_each_and_the_worker_lives(worker):
    """Reliability #3: bytes that are not UTF-8, UTF-16, NUL, deep nesting (which raised RecursionError and
    ended the worker), non-finite numbers, huge numbers: one bad_request each, in order, and no answer for a
    blank line; CRLF and a UTF-8 byte order mark are fine."""
    bad = [
        b"\xff\xfe\x00\xff garbage",
        '{"op":"hello"}'.encode("utf-16"),
        '{"op":"hello"}'.encode("utf-16-le"),
        b"\x00",
        b'{"op":"hello"}\x00',
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"op":"hello","x":' + b"[" * (DEPTH_LIMIT) + b"]" * (DEPTH_LIMIT) + b"}",
        b'{"op":"hello","x":NaN}',
        b'{"op":"hello","x":-Infinity}',
        b'{"op":"cancel","job":"a","x":[1e400]}',
        b'{"op":"hello","x":' + b"9" * 5000 + b"}",
        b'{"op":"hello"',
        b"\xef\xbb\xbf",
        b"\x0c",
    ]
    ok_depth = b'{"op":"hello","x":' + b"[" * (DEPTH_LIMIT - 1) + b"]" * (DEPTH_LIMIT - 1) + b"}"  # just deep enough
    worker.write(b"\n".join(bad) + b"\n \t\r\n\n")
    events = worker.answers_before_ready()
    assert error_kinds(events) == ["bad_request"] * len(bad), events
    assert [event["job"] for event in events] == [None if b'"job":"a"' not in line else "a" for line in bad]
    assert all(event["message"].endswith(".") for event in events)
    for line in (b'{"op":"hello"}\r\n', b'\xef\xbb\xbf{"op":"hello"}\n', ok_depth + b"\n"):
        worker.write(line)
        assert worker.next_event()["event"] == "ready"
    worker.write(b'{"op":"generate","job":"n","params":{"prompt":NaN},"out_dir":"/tmp/n"}\n')
    assert worker.next_event() == {"event": "error", "job": "n", "kind": "bad_request",
                                   "message": "The line has a number that is not finite (nan); send finite numbers only."}


def _peak_memory_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from /proc")
def test_a_line_longer_than_the_limit_is_refused_without_holding_it(worker):
    """Reliability #3: a 96 MiB line gets one bad_request, the next line is read normally, and the worker's
    peak memory grows by far less than the line (it is read in chunks and dropped)."""
    assert worker.answers_before_ready() == []  # the engine is imported: its memory is in the baseline
    before = _peak_memory_kib(worker.process.pid)
    huge = b'{"op":"hello","pad":"' + b"a" * (96 << 20) + b'"}\n'
    worker.write(huge + b'{"op":"hello","pad":"' + b"a" * (LINE_LIMIT - 23) + b'"}\n')  # exactly 1 MiB: fine
    event = worker.next_event()
    assert event == {"event": "error", "job": None, "kind": "bad_request",
                     "message": f"The line is longer than {LINE_LIMIT} bytes; it was skipped."}
    assert worker.next_event()["event"] == "ready"
    assert _peak_memory_kib(worker.process.pid) - before < 32 << 10


def test_error_messages_quote_a_shortened_value(worker, tiny_model, tmp_path):
    """Reliability #12: a 1 MB value does not make a 1 MB message (the worker's own messages quote about
    100 characters; any error message is cut at 1000)."""
    worker.send({"op": "x" * 1_000_000})  # under the line limit
    event = worker.next_event()
    assert event["kind"] == "bad_request" and len(event["message"]) < 200, len(event["message"])
    assert event["message"].startswith("Unknown op 'xxx") and "…" in event["message"]
    worker.send({"op": "generate", "job": "k", "params": {**params(tiny_model), "k" * 100_000: 1}, "out_dir": str(tmp_path / "k")})
    event = worker.until(lambda event: event["event"] == "error")[-1]
    assert (event["job"], event["kind"]) == ("k", "bad_request") and len(event["message"]) <= 1000


def test_shorten_quotes_a_value_in_at_most_limit_characters():
    """Reliability #12: ``errors.shorten`` is the repr of a value, cut with "…"; error_event caps messages."""
    from backend.errors import shorten

    assert shorten("fly") == "'fly'"
    assert shorten([1, 2]) == "[1, 2]"
    long = shorten("y" * 10_000_000)
    assert len(long) == 100 and long.startswith("'yyy") and long.endswith("…")
    assert len(shorten(list(range(10_000)), limit=20)) == 20
    assert shorten("\ud800") == "'\\ud800'"
    assert shorten([[[]]] * 3) == "[[[]], [[]], [[]]]"
    assert len(protocol.error_event(None, "bad_request", "z" * 5000)["message"]) == 1000
    assert (protocol.MAX_LINE_BYTES, protocol.MAX_DEPTH) == (LINE_LIMIT, DEPTH_LIMIT)  # as docs/protocol.md says


def test_a_cancel_for_no_queued_or_running_job_does_nothing(worker, tiny_model, tmp_path):
    """Reliability #11: a cancel for a job id not (yet) queued is not kept: it gets no answer and the job
    sent after it with that id runs."""
    worker.send({"op": "cancel", "job": "s"})
    assert worker.answers_before_ready() == []
    run_tiny_job(worker, tiny_model, tmp_path / "s", "s")


def test_a_cancel_stops_only_the_jobs_queued_or_running_when_it_arrives(worker, tiny_model, tmp_path):
    """Reliability #11: two queued jobs with one id are both cancelled by one cancel, before they start; a
    third with that id sent after the cancel runs (the cancel of a job that never started used to stay)."""
    # 500 steps of 7 windows: long enough, unless cancelled, which it is at once.
    blocker = params(tiny_model, steps=500, width=512, height=128)
    worker.send({"op": "generate", "job": "blocker", "params": blocker, "out_dir": str(tmp_path / "b")})
    worker.until(lambda event: event.get("stage") == "denoising")  # the blocker runs: what follows is queued
    for index, request in enumerate(["generate", "generate", "cancel", "generate", "cancel blocker"]):
        if request == "generate":
            worker.send({"op": "generate", "job": "d", "params": params(tiny_model), "out_dir": str(tmp_path / f"d{index}")})
        else:
            worker.send({"op": "cancel", "job": "blocker" if request.endswith("blocker") else "d"})
    ends = []
    while len(ends) < 4:
        event = worker.next_event()
        if event["event"] in ("done", "error"):
            ends.append((event["job"], event.get("kind", "done")))
    assert ends == [("blocker", "cancelled"), ("d", "cancelled"), ("d", "cancelled"), ("d", "done")]
    assert (tmp_path / "d3" / "panorama.png").exists() and not (tmp_path / "d0").exists()


# -------------------------------------------------------------------------------- the oracle: what the docs say


def _json_depth_ok(value, depth=1) -> bool:
    if isinstance(value, (list, dict)):
        if depth > DEPTH_LIMIT:
            return False
        items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
        return all(_json_depth_ok(item, depth + 1) for item in items if isinstance(item, (list, dict)))
    return True


def _strings_and_floats_ok(value) -> bool:
    if isinstance(value, str):
        return not any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_strings_and_floats_ok(key) and _strings_and_floats_ok(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_strings_and_floats_ok(item) for item in value)
    return True


def documented_request(segment: bytes):
    """What docs/protocol.md makes of one line (bytes without its newline): "blank" (no answer), "bad" (one
    bad_request) or the valid request dict. Written from the document, not from backend/protocol.py."""
    if not segment.strip(b" \t\r"):
        return "blank"
    if len(segment) > LINE_LIMIT:
        return "bad"
    try:
        value = json.loads(segment.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return "bad"
    if not (_json_depth_ok(value) and _strings_and_floats_ok(value)) or not isinstance(value, dict):
        return "bad"
    op = value.get("op")
    if op not in REQUEST_OPS or (op in ("generate", "cancel", "fetch") and not isinstance(value.get("job"), str)):
        return "bad"
    out_dir = value.get("out_dir")
    if op == "generate" and not (isinstance(value.get("params"), dict) and isinstance(out_dir, str) and os.path.isabs(out_dir)):
        return "bad"
    return value


def expected_answers(line: bytes):
    """How many bad_request events ``line`` (which may hold newlines) must get, or None when a part of it
    is a valid request (the fuzzer sends only bad lines)."""
    verdicts = [documented_request(segment) for segment in line.split(b"\n")]
    if any(isinstance(verdict, dict) for verdict in verdicts):
        return None
    return verdicts.count("bad")


# ------------------------------------------------------------------------------------------ the fuzz strategies

SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
TEXT = st.lists(st.one_of(st.characters(), SURROGATE, st.sampled_from("\n\r\x00\ufeff\"\\")), max_size=30).map("".join)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 5e-324]))
INTEGERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**63, 10**4299, 10**1000]))
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, FLOATS, TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                           max_leaves=12)


def json_line(value, ascii_only: bool) -> bytes:
    """``value`` as JSON text (NaN and Infinity as their bare tokens); surrogates either escaped (ASCII) or
    as raw bytes, which are not UTF-8."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def deep(depth: int, opener: bytes, closed: bool, inside_request: bool) -> bytes:
    closer = {b"[": b"]", b'{"a":': b"}"}[opener]
    body = opener * depth + (b"0" + closer * depth if closed else b"")
    return b'{"op":"hello","x":' + body + b"}" if inside_request else body


def huge(size: int, kind: str) -> bytes:
    """A line of exactly ``size`` bytes: a hello padded to it (valid but for its length), or brackets."""
    if kind == "brackets":
        return b"[" * size
    head, tail = b'{"op":"hello","pad":"', b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def mutate(line: bytes, position: int, action: str, byte: int) -> bytes:
    position %= len(line)
    if action == "truncate":
        return line[:position]
    if action == "delete":
        return line[:position] + line[position + 1:]
    if action == "replace":
        return line[:position] + bytes([byte]) + line[position + 1:]
    return line[:position] + bytes([byte]) + line[position:]


VALID_LINES = [b'{"op":"hello"}', b'{"op":"cancel","job":"c"}',
               b'{"op":"generate","job":"g","params":{"prompt":"p","steps":1},"out_dir":"/tmp/fuzz-out"}']
REQUEST_LIKE = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(REQUEST_OPS), JSON_VALUES)},
    optional={"job": JSON_VALUES, "params": JSON_VALUES, "out_dir": st.one_of(JSON_VALUES, st.just("/abs/out"))},
)
BAD_LINE = st.one_of(
    st.binary(min_size=1, max_size=300),
    TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.builds(json_line, JSON_VALUES, st.booleans()),
    st.builds(json_line, REQUEST_LIKE, st.booleans()),
    st.builds(deep, st.sampled_from([DEPTH_LIMIT + 1, 100, 1000, 100_000]), st.sampled_from([b"[", b'{"a":']),
              st.booleans(), st.booleans()),
    st.builds(huge, st.sampled_from([LINE_LIMIT + 1, LINE_LIMIT + 4096, 3 * LINE_LIMIT]), st.sampled_from(["hello", "brackets"])),
    st.builds(lambda line, codec: line.encode(codec), st.sampled_from([line.decode() for line in VALID_LINES]),
              st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"])),
    st.builds(lambda token, line: line.replace(b'"op"', b'"x":' + token + b',"op"', 1),
              st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b'"\\udc80"', b'"\\ud83d"']),
              st.sampled_from(VALID_LINES)),
    st.builds(mutate, st.sampled_from(VALID_LINES), st.integers(0, 200), st.sampled_from(["truncate", "delete", "replace", "insert"]),
              st.integers(0, 255)),
).filter(lambda line: expected_answers(line) is not None)

FIELDS = [field.name for field in dataclasses.fields(GenerateRequest)]
# Fields are checked only where they apply (sun_ratio for equirect jobs, sync_* for SyncDiffusion), so the
# fuzzed fields go onto one of these settings of a tiny job.
CONTEXTS = [{}, {"layout": "equirect", "width": 256, "height": 128}, {"layout": "wide", "width": 256},
            {"sync": "syncdiffusion"}, {"sync": "syncsde"}, {"layout": "equirect", "width": 256, "height": 128, "views": "band+poles"},
            {"mad_steps": 1}]
PLAUSIBLE = st.sampled_from([[1e400, 0], [0, 0], [0, 90, 3], "0,45", "band+poles", "cube", "ddim", "euler-a", "lcm",
                             "syncdiffusion", "equirect", "cuda", "cuda:7", "mps", "float16", "bfloat16", "low", "true",
                             "false", "1", "-1", "1e3", "", " ", "caf\udce9", "down,mid", "lpips-vgg", "style", True, False, 0, -1, 2**64, 0.5])
FUZZ_NAMES = FIELDS + ["out", "colour", ""]
# Each request fuzzes the next name of FUZZ_NAMES in turn (hypothesis would favour the first names of a
# sampled_from) with a drawn value, in a drawn context, sometimes with one more drawn field.
# Values without lone surrogates (the protocol refuses those before any field is read; the "caf\udce9" of
# PLAUSIBLE checks that): every JSON type, non-finite and huge numbers.
PARAM_INTEGERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**63, 2**64, -10**30, 10**30]))
PARAM_VALUES = st.one_of(st.recursive(st.one_of(st.none(), st.booleans(), PARAM_INTEGERS, FLOATS, st.text(max_size=20)),
                                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                      max_leaves=6),
                         PLAUSIBLE)
FUZZ_PARAMS = st.tuples(st.sampled_from(CONTEXTS), PARAM_VALUES,
                        st.dictionaries(st.sampled_from(FUZZ_NAMES), PARAM_VALUES, max_size=1))

FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example])
# No shrinking: the worker carries state from one example to the next (a dead worker fails every later
# example), so a shrunk example would not reproduce; each failure message shows its own input instead.


def test_fuzz_every_bad_line_gets_exactly_one_bad_request(worker, tiny_model, tmp_path):
    """Random bytes, random JSON and request-like objects, UTF-16, deep nesting, huge lines, non-finite
    numbers, lone surrogates, mutated requests, sent in batches: each bad line gets exactly one bad_request,
    no other answer comes, the worker stays alive, and a real job runs after every 20 batches and at the end."""
    batches = itertools.count()

    @settings(max_examples=50, **FUZZ_SETTINGS)
    @given(st.lists(BAD_LINE, min_size=1, max_size=6))
    def check(lines):
        worker.write(b"\n".join(lines) + b"\n")
        events = worker.answers_before_ready()
        expected = sum(expected_answers(line) for line in lines)
        assert error_kinds(events) == ["bad_request"] * expected, _short((events, [line[:200] for line in lines]))
        batch = next(batches)
        if batch % 20 == 19:
            run_tiny_job(worker, tiny_model, tmp_path / f"job{batch}", "fuzz-job")

    check()
    run_tiny_job(worker, tiny_model, tmp_path / "last", "fuzz-last")


TYPE_SWEEP = [None, True, False, "text", "", 1.5, -1, 0, 2**64, [], [0, 0], ["a"], {}, {"a": 1}]
"""One value of each JSON type (and edge), tried in every field before the random values."""


def fuzz_generate_params(worker, tiny_model, out_root, numbers, batch) -> list[tuple]:
    """Send one generate request per ``(context, fields)`` of ``batch`` (fields over a tiny job whose model
    is a missing path) and check each gets exactly one error and nothing else ran. Returns the wrong
    answers: (fields, kind, message) for each error that is not bad_request or model_not_found."""
    jobs = {}
    for context, fields in batch:
        job = f"fuzz-{next(numbers)}"
        jobs[job] = {**context, **fields}
        base = {**params(tiny_model, steps=1), "model": str(out_root / "no-such-model")}
        request = {"op": "generate", "job": job, "params": {**base, **jobs[job]}, "out_dir": str(out_root / job)}
        worker.write(json_line(request, ascii_only=True) + b"\n")
    # A job the job thread refuses at once: it answers in order, so every job above has been answered.
    fence = f"fence-{next(numbers)}"
    worker.send({"op": "generate", "job": fence, "params": {}, "out_dir": str(out_root / fence)})
    events = worker.until(lambda event: event["event"] == "error" and event["job"] == fence)[:-1]
    ends = [event for event in events if event["event"] in ("done", "error")]
    assert sorted(event["job"] for event in ends) == sorted(jobs), _short((ends, jobs))  # one answer each
    return [(jobs[event["job"]], event.get("kind", "done"), event.get("message")) for event in ends
            if error_kinds([event]) not in (["bad_request"], ["model_not_found"])]


def test_fuzz_generate_params_of_every_type_get_bad_request_never_internal(worker, tiny_model, tmp_path):
    """Generate requests whose params hold values of every JSON type in every field (a sweep), then random
    values (hypothesis: nested, non-finite and huge numbers, text) for known and unknown names in several
    settings of a job, the model a missing path unless it is the fuzzed field: each gets exactly one error,
    of kind bad_request or model_not_found, never internal and never done.

    Wrong kinds are collected across the whole run and listed at the end; a missing or extra answer, a crash
    or a hang fails at once."""
    numbers = itertools.count()
    wrong = []
    sweep = [({}, {name: value}) for name in FIELDS for value in TYPE_SWEEP]
    # The fields read only once the model is found, with the real model (a value taken would run a job).
    sweep += [({"model": tiny_model}, {name: value}) for name in ("model_config", "allow_pickle", "lora", "scheduler", "device", "dtype")
              for value in ([0, 0], {"a": 1})]
    for start in range(0, len(sweep), 100):
        wrong += fuzz_generate_params(worker, tiny_model, tmp_path, numbers, sweep[start:start + 100])

    @settings(max_examples=60, **FUZZ_SETTINGS)
    @given(st.lists(FUZZ_PARAMS, min_size=2, max_size=6))
    def check(fuzzed):
        batch = [(context, {FUZZ_NAMES[next(names) % len(FUZZ_NAMES)]: value, **extra}) for context, value, extra in fuzzed]
        wrong.extend(fuzz_generate_params(worker, tiny_model, tmp_path, numbers, batch))

    names = itertools.count()
    check()
    run_tiny_job(worker, tiny_model, tmp_path / "last", "params-last")
    assert not wrong, f"{len(wrong)} wrong answers:\n" + "\n".join(
        f"{_short(fields, 200)} -> {kind}: {message}" for fields, kind, message in wrong)
