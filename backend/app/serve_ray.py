"""``python -m backend serve --ray --token-file FILE``: shared serving on Ray Serve (docs/running.md, "Ray Serve").

Two deployments: ``Ingress``, one replica holding the HTTP API (``http_api.JobApi``: the token, the jobs and their
events), and ``JobReplica``, one replica per GPU (one GPU each; one CPU each with ``--cpu`` or on a cluster
without GPUs), each running one job at a time with its model kept loaded between jobs (``server.JobRunner``, the
stdio worker's own). Ray Serve queues the jobs and hands each to a free replica; a job's events stream from its
replica to the ingress, which keeps them for the clients. Replicas write each job into ``OUT/<job id>/``, which
the ingress reads to send the files: on a cluster of several machines OUT must be a folder every node sees.

Serve's HTTP proxy listens on --host (loopback unless --allow-remote) and --port; Ray's own processes listen on
ports of every interface, as for ``batch`` (Ray 2.60 requires its token there). Ray Serve is optional for a local
user (``requirements-ray.txt``) and imported only here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time

from .. import __version__, protocol
from ..errors import BadRequest
from . import http_api
from .batch import import_ray, start_ray

APP_NAME = "syncsphere"
SERVE_MISSING = ("Ray Serve is not installed in this Python; install it with 'pip install -r requirements-ray.txt' "
                 "(serving needs it, local generation does not).")


class JobReplica:
    """One GPU's worker (a Ray Serve deployment, ``max_ongoing_requests=1``): runs one job at a time with
    ``server.JobRunner``, the model kept loaded between jobs."""

    def __init__(self):
        from .server import JobRunner

        self.runner = JobRunner()
        # One thread: a cancelled job still finishing its step holds it, and the next job waits for it.
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="syncsphere-job")

    async def run(self, job_id: str, params: dict, out_dir: str):
        """Run the job and yield its events (progress, then done or error), as the stdio worker sends them. When
        the request is cancelled (the client's cancel), the job stops before its next denoising step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def send(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work():
            try:
                outputs = self.runner.run(job_id, params, out_dir, send, cancelled.is_set)
                if outputs is not None:
                    send(protocol.done_event(job_id, outputs))
            finally:
                send(None)

        loop.run_in_executor(self.thread, work)
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            cancelled.set()  # a cancelled request (or a client gone): the job stops at its next step


class Ingress:
    """The HTTP API (a Ray Serve ingress deployment, one replica): ``http_api.JobApi`` with jobs run on the
    ``JobReplica`` deployment behind ``runner`` (a DeploymentHandle)."""

    def __init__(self, runner, token_sha256: str, out_root: str, ready: dict, max_jobs: int):
        self.runner = runner.options(stream=True)
        self.api = http_api.JobApi(token_sha256, out_root, self._run_events, ready, max_jobs=max_jobs)

    def _run_events(self, job_id: str, params: dict, out_dir: str):
        return self.runner.run.remote(job_id, params, out_dir)

    async def __call__(self, request):
        """Answer one HTTP request (``http_api.JobApi``)."""
        return await self.api(request)


def import_serve():
    """The ``ray.serve`` module, or BadRequest with one sentence saying how to install it."""
    import_ray()
    try:
        from ray import serve
    except ImportError:
        raise BadRequest(SERVE_MISSING) from None
    return serve


def start_serving(token: str, out_root: str, *, host: str = "127.0.0.1", port: int = 8600,
                  replicas: int | None = None, cpu: bool = False, address: str | None = None,
                  max_jobs: int = http_api.MAX_JOBS) -> str:
    """Start (or join) Ray, deploy ``JobReplica`` (``replicas`` of them: default one per GPU of the cluster, or
    one on the CPU with ``cpu`` or without GPUs) and ``Ingress`` behind Serve's HTTP proxy on ``host:port``.
    Returns the API's base URL. The caller checks ``host`` (``http_api.check_host``) and stops it all with
    ``stop_serving``."""
    serve = import_serve()
    ray = start_ray(address, replicas, cpu)
    gpus = 0 if cpu else int(ray.cluster_resources().get("GPU", 0))
    replicas = replicas or max(gpus, 1)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    out_root = os.path.abspath(os.path.expanduser(out_root))
    os.makedirs(out_root, exist_ok=True)
    serve.start(http_options={"host": host, "port": port})
    runner = serve.deployment(JobReplica, name="JobReplica", num_replicas=replicas, max_ongoing_requests=1,
                              ray_actor_options=resources).bind()
    # Streams wait on events, they do not compute: the one ingress replica holds many at once.
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=4 * http_api.MAX_STREAMS)
    app = ingress.bind(runner, http_api.token_digest(token), out_root, _ready_event(bool(gpus)), max_jobs)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop_serving() -> None:
    """Stop the Serve application and this process's Ray (a local cluster stops; a remote one is disconnected)."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _ready_event(gpu: bool) -> dict:
    """The hello answer: the protocol's ready event for the replicas' device (cuda with GPUs, else cpu)."""
    import torch

    from ..engine.models import resolve_dtype

    device = torch.device("cuda" if gpu else "cpu")
    return protocol.ready_event(__version__, str(device), str(resolve_dtype("auto", device)).replace("torch.", ""))


def serve_ray_command(args) -> int:
    """``python -m backend serve --ray``: check the token file and the host, start serving, print the URL on
    stderr, and serve until interrupted (Ctrl-C or SIGTERM); exit code 0, or 2 for a bad flag (BadRequest)."""
    token = http_api.read_token_file(args.token_file) if args.token_file else None
    if token is None:
        raise BadRequest("serve --ray needs --token-file FILE: every request must carry that token (docs/running.md).")
    http_api.check_host(args.host, args.allow_remote)
    if not 0 < args.port < 65536:
        raise BadRequest(f"--port must be between 1 and 65535, not {args.port}.")
    if args.replicas is not None and args.replicas < 1:
        raise BadRequest(f"--replicas must be at least 1, not {args.replicas}.")
    if args.max_jobs < 1:
        raise BadRequest(f"--max-jobs must be at least 1, not {args.max_jobs}.")
    import_serve()
    url = start_serving(token, host=args.host, port=args.port, out_root=args.out, replicas=args.replicas,
                        cpu=args.cpu, address=args.ray_address, max_jobs=args.max_jobs)
    print(f"serving on {url} (docs/running.md); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_serving()
    return 0
