"""The shared server's load test in numbers (``python -m backend serve --ray``, issue 19): jobs, events and seconds.

Starts the server as a user does (a local Ray cluster, ``--cpu --replicas 2``, loopback, a token file) with the
tests' tiny model, then runs the tests' load (``tests/test_serve_http.run_load``: N clients at once, each submitting
a 1-step 128 x 128 tile job, streaming its events to done and reading them again from the start) and, as the
baseline in the same run, the same jobs from one client one after another. Prints the jobs submitted and done,
the events streamed (and whether the replay matched every stream), the seconds and jobs per minute of each, and
the ratio concurrent / one-by-one. On 2 CPU cores both are bound by the 2 replicas, so the ratio shows the HTTP
layer's overhead under load, not a speed-up.

    python benchmarks/bench_serve_load.py               # 50 clients (a minute or two on 2 cores)
    python benchmarks/bench_serve_load.py --clients 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # never download
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from conftest import register_extension_package  # noqa: E402
from model_factory import save_random_sd_model  # noqa: E402

register_extension_package()  # the tests' module imports the add-on's client as syncsphere.blender_addon.core
from test_serve_http import TOKEN, call, events_of, free_port, job_params, run_load, start_server  # noqa: E402


def one_by_one(url: str, model: str, jobs: int) -> tuple[int, int, float]:
    """(jobs done, events streamed, seconds) of ``jobs`` jobs submitted by one client, each after the last ended."""
    done, events, started = 0, 0, time.perf_counter()
    for number in range(jobs):
        status, answer = call(url + "/v1/jobs", "POST", job_params(model, seed=1000 + number), timeout=60)
        assert status == 202, answer
        streamed = events_of(url, json.loads(answer)["job"], timeout=300)
        events += len(streamed)
        done += streamed[-1]["event"] == "done"
    return done, events, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients, one job each (default 50)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        model = save_random_sd_model(os.path.join(folder, "tiny-sd"))
        token_file = os.path.join(folder, "token")
        with open(token_file, "w") as file:
            file.write(TOKEN)
        port = free_port()
        process = start_server(token_file, os.path.join(folder, "jobs"), port, os.path.join(folder, "server.log"))
        url = f"http://127.0.0.1:{port}"
        try:
            one_by_one(url, model, 2)  # both replicas load the model before anything is timed
            clients, streamed, replayed, failures, seconds = run_load(url, model, clients=args.clients)
            done = sum(events[-1]["event"] == "done" for events in streamed.values())
            events = sum(len(events) for events in streamed.values())
            same = all(streamed[job] == replayed[job] for job in streamed)
            base_done, base_events, base_seconds = one_by_one(url, model, args.clients)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    print(f"{'':<28}{'jobs':>6}{'done':>6}{'events':>8}{'seconds':>9}{'jobs/min':>10}")
    print(f"{f'{clients} clients at once':<28}{clients:>6}{done:>6}{events:>8}{seconds:>9.1f}{60 * done / seconds:>10.1f}")
    print(f"{'one client, one by one':<28}{args.clients:>6}{base_done:>6}{base_events:>8}{base_seconds:>9.1f}"
          f"{60 * base_done / base_seconds:>10.1f}")
    print(f"concurrent / one-by-one seconds: {seconds / base_seconds:.2f}; every replayed stream matched: {same}; "
          f"failures: {len(failures)}" + (f" ({failures[0]})" if failures else ""))


if __name__ == "__main__":
    main()
