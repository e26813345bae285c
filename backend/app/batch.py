"""``python -m backend batch JOBS.jsonl --out DIR``: many jobs on a Ray cluster (docs/running.md, "Ray batch").

Ray is the scheduler; nothing here schedules beyond handing the next job to a free worker. One Ray actor per
worker (``BatchWorker``) keeps its model loaded between jobs (``engine.models.ModelCache``), each asking for one
GPU (one CPU with ``--cpu``). A worker runs ``check_request`` and ``run_job`` into a temporary folder on its own
node and hands back the files' bytes, so the cluster needs no shared disk; the driver writes each job's set
into ``DIR/<job id>/`` as a unit (``products.files.write_files_atomically``: a hidden folder, then one rename),
so a folder there is always a finished job. A re-run skips the jobs whose folder is there. A worker that dies
mid-job (killed, out of host memory, its node lost) is replaced, and its job goes to the next free worker;
nothing of it was written. A job that fails (a bad parameter, a missing model, out of GPU memory) is reported
in one line and left for a re-run.

Ray is optional for a local user (``requirements-ray.txt``) and imported only here, when a batch runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import time

from ..errors import BadRequest, SyncSphereError

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""What a job id (the name of its folder in DIR) may be."""
MAX_ATTEMPTS = 3
"""How many times a job is started at most when the workers running it die."""
FINISHED_MARK = "metadata.json"
"""The file whose presence in ``DIR/<job id>/`` says the job is finished (the set appears whole, at once)."""
RAY_MISSING = ("Ray is not installed in this Python; install it with 'pip install -r requirements-ray.txt' "
               "(a batch needs Ray, local generation does not).")


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """One line of JOBS.jsonl: its ``id`` (the line's ``id``, else ``job-NNNN`` from its line number), its
    protocol ``params`` and its line number."""

    id: str
    params: dict
    line: int


@dataclasses.dataclass
class BatchSummary:
    """How a batch went: the job ids done now, skipped (finished before), failed ({id: sentence}), the
    attempts that died with their worker, and the wall seconds from the first job handed out to the last
    result."""

    done: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    failed: dict = dataclasses.field(default_factory=dict)
    retried: int = 0
    seconds: float = 0.0

    @property
    def jobs_per_minute(self) -> float:
        """Jobs done now per minute of wall time (0 when none ran)."""
        return 60 * len(self.done) / self.seconds if self.seconds > 0 else 0.0


def read_jobs(path: str, out_dir: str, cpu: bool = False) -> list[BatchJob]:
    """The jobs of the JSON-lines file ``path``, each checked as far as the standard library can
    (``GenerateRequest.validated``) before anything starts. Blank lines and lines starting with ``#`` are
    skipped. ``cpu``: a job without a ``device`` runs on the CPU. Raises BadRequest naming the first bad line."""
    from ..request import GenerateRequest

    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadRequest(f"The jobs file {path} cannot be read ({getattr(error, 'strerror', None) or error}).") from None
    jobs, seen = [], set()
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"{path}, line {number}"
        try:
            params = json.loads(text)
        except ValueError:
            raise BadRequest(f"{where} is not a JSON object.") from None
        if not isinstance(params, dict):
            raise BadRequest(f"{where} is not a JSON object.")
        job_id = params.pop("id", f"job-{number:04d}")
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise BadRequest(f"{where}: the id must be a folder name of letters, digits, '.', '_' and '-' "
                             f"(at most 100), not {job_id!r}.")
        if job_id in seen:
            raise BadRequest(f"{where}: the id {job_id} is used twice.")
        if "out" in params:
            raise BadRequest(f"{where}: a job has no out; it is written into {os.path.join(out_dir, job_id)}.")
        seen.add(job_id)
        if cpu:
            params.setdefault("device", "cpu")
        params["preview_every"] = 0  # nobody watches a batch's previews
        try:
            GenerateRequest.from_params({**params, "out": os.path.join(out_dir, job_id)}).validated()
        except (BadRequest, TypeError) as error:
            raise BadRequest(f"{where}: {error}") from None
        jobs.append(BatchJob(job_id, params, number))
    if not jobs:
        raise BadRequest(f"{path} has no jobs.")
    return jobs


def is_finished(out_dir: str, job_id: str) -> bool:
    """Whether ``DIR/<job id>/`` holds a finished job (its set is written as a unit, metadata.json with it)."""
    return os.path.isfile(os.path.join(out_dir, job_id, FINISHED_MARK))


class BatchWorker:
    """One worker of a batch, a Ray actor (``ray.remote(BatchWorker)``): runs jobs one at a time with its model
    kept loaded between them."""

    def __init__(self):
        self.models = None

    def pid(self) -> int:
        """The worker's process id (tests kill it)."""
        return os.getpid()

    def run(self, job_id: str, params: dict) -> dict:
        """Run one job into a temporary folder here and return {"files": {name: bytes}, "outputs": the done
        event's outputs with file names for paths, "seconds"}, or {"error": kind, "message": sentence}."""
        from ..engine.models import ModelCache
        from ..request import GenerateRequest
        from .job import check_request, run_job
        from .server import output_paths

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="syncsphere-batch-") as folder:
            out = os.path.join(folder, job_id)
            try:
                checked = check_request(GenerateRequest.from_params({**params, "out": out}))
                self.models = self.models or ModelCache()
                outputs = run_job(checked, None, self.models)
            except SyncSphereError as error:
                return {"error": error.kind, "message": str(error)}
            files = {}
            for path in output_paths(outputs):
                with open(path, "rb") as file:
                    files[os.path.relpath(path, out)] = file.read()
        return {"files": files, "outputs": _relative(outputs, out), "seconds": time.perf_counter() - started}


def _relative(outputs: dict, folder: str) -> dict:
    """``outputs`` with every path made relative to ``folder``."""
    return {key: _relative(value, folder) if isinstance(value, dict) else os.path.relpath(value, folder)
            for key, value in outputs.items()}


def write_job_files(out_dir: str, job_id: str, files: dict) -> None:
    """Write a job's ``files`` ({name: bytes}) into ``DIR/<job id>/`` as a unit (a hidden folder, then one
    rename: ``files.write_files_atomically``)."""
    from ..products.files import write_files_atomically

    def writer(data: bytes):
        def write(path: str) -> None:
            with open(path, "wb") as file:
                file.write(data)
        return write

    write_files_atomically(os.path.join(out_dir, job_id), [(name, writer(data)) for name, data in files.items()])


def import_ray():
    """The ``ray`` module, or BadRequest (exit code 2) with one sentence saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BadRequest(RAY_MISSING) from None
    return ray


def start_ray(address: str | None, workers: int | None, cpu: bool):
    """Connect to the Ray cluster at ``address``, or start a local one (no dashboard; with ``--cpu`` as many CPUs
    as workers). Ray's own processes listen on ports of every interface, however it is started (Ray's design;
    Ray 2.60 requires its token, kept in ~/.ray/auth_token, docs/running.md): a batch is asked for, never a
    default. Returns the ray module."""
    ray = import_ray()
    if not ray.is_initialized():
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=(workers or 1) if cpu else None, include_dashboard=False, log_to_driver=False,
                     # the workers import this SyncSphere (on a cluster of one's own, it is installed on each node)
                     runtime_env={"env_vars": {"PYTHONPATH": package_root}})
    return ray


def run_batch(jobs: list[BatchJob], out_dir: str, *, workers: int | None = None, cpu: bool = False,
              address: str | None = None, progress: bool = True, on_start=None) -> BatchSummary:
    """Run ``jobs`` on Ray: skip the finished ones, hand the others to ``workers`` BatchWorker actors (default:
    the cluster's GPUs; 1 with ``cpu``), write each result into ``out_dir/<job id>/`` as it arrives, and replace a
    worker that dies, giving its job to the next free one (at most MAX_ATTEMPTS starts per job).

    progress: a bar counting jobs on stderr. on_start(job id, worker pid): called as each job is handed out.
    Returns the BatchSummary."""
    ray = start_ray(address, workers, cpu)
    summary = BatchSummary()
    summary.skipped = [job.id for job in jobs if is_finished(out_dir, job.id)]
    pending = [job for job in jobs if job.id not in summary.skipped]
    if workers is None:
        workers = 1 if cpu else max(int(ray.cluster_resources().get("GPU", 0)), 1)
    workers = max(1, min(workers, len(pending) or 1))
    bar = _progress_bar(len(jobs), len(summary.skipped)) if progress else None
    actor_class = ray.remote(num_cpus=1, num_gpus=0)(BatchWorker) if cpu else ray.remote(num_gpus=1)(BatchWorker)

    def new_worker():
        actor = actor_class.remote()
        return actor, ray.get(actor.pid.remote())

    started = time.perf_counter()
    attempts = {job.id: 0 for job in pending}
    queue = list(pending)
    idle = [new_worker() for _ in range(workers)] if pending else []
    running = {}  # result ref -> (job, (actor, pid))
    try:
        while queue or running:
            while queue and idle:
                job, worker = queue.pop(0), idle.pop()
                attempts[job.id] += 1
                running[worker[0].run.remote(job.id, job.params)] = (job, worker)
                if on_start is not None:
                    on_start(job.id, worker[1])
            [ready], _ = ray.wait(list(running), num_returns=1)
            job, worker = running.pop(ready)
            if _take_result(ray, ready, job, out_dir, summary, bar):
                idle.append(worker)
                continue
            # The worker died mid-job: nothing of the job was written here. Replace it; retry the job.
            summary.retried += 1
            ray.kill(worker[0], no_restart=True)
            idle.append(new_worker())
            if attempts[job.id] < MAX_ATTEMPTS:
                queue.insert(0, job)
            else:
                _fail(summary, job, f"its worker died {MAX_ATTEMPTS} times while running it", bar)
    finally:
        summary.seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
        for actor, _ in idle + [worker for _, worker in running.values()]:
            ray.kill(actor, no_restart=True)
    return summary


def _take_result(ray, ready, job: BatchJob, out_dir: str, summary: BatchSummary, bar) -> bool:
    """Write the finished job ``ready``'s files into ``out_dir/<job id>/`` (or record its failure); False when its
    worker died before it finished (nothing was written)."""
    try:
        result = ray.get(ready)
    except ray.exceptions.RayActorError:
        return False
    try:
        if "error" in result:
            raise SyncSphereError(result["message"])
        write_job_files(out_dir, job.id, result["files"])
    except SyncSphereError as error:
        _fail(summary, job, str(error), bar)
        return True
    summary.done.append(job.id)
    if bar is not None:
        bar.update(1)
    return True


def _fail(summary: BatchSummary, job: BatchJob, sentence: str, bar) -> None:
    summary.failed[job.id] = sentence
    message = f"error: job {job.id} (line {job.line}): {sentence}"
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _progress_bar(total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="job", desc="batch", file=sys.stderr)


def batch_command(args) -> int:
    """``python -m backend batch``: run the jobs file, print a summary on stderr; exit 0 when every job is
    finished, 1 when some failed (a re-run retries them), 2 for a bad jobs file or a missing Ray."""
    out_dir = os.path.abspath(os.path.expanduser(args.out))
    jobs = read_jobs(args.jobs, out_dir, cpu=args.cpu)
    if args.workers is not None and args.workers < 1:
        raise BadRequest(f"--workers must be at least 1, not {args.workers}.")
    import_ray()  # before the output folder is made: one sentence when Ray is missing
    os.makedirs(out_dir, exist_ok=True)
    ray = start_ray(args.ray_address, args.workers, args.cpu)
    try:
        summary = run_batch(jobs, out_dir, workers=args.workers, cpu=args.cpu, address=args.ray_address)
    finally:
        ray.shutdown()  # a local cluster stops; a remote one is only disconnected from
    rate = f" ({summary.jobs_per_minute:.1f} jobs/minute)" if summary.done else ""
    print(f"batch: {len(summary.done)} done in {summary.seconds:.1f} s{rate}, {len(summary.skipped)} skipped "
          f"(finished before), {len(summary.failed)} failed, {summary.retried} retried after a worker died; "
          f"results in {out_dir}", file=sys.stderr)
    return 1 if summary.failed else 0

