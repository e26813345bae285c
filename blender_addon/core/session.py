"""The add-on's single backend worker and the generations running on it, shared by operators and panels.

Plain Python (no bpy). One worker process per Blender session, kept warm between jobs (unless the
preferences say otherwise) and replaced when its interpreter changes or it has died. One Generate press is one
``Batch``: its variations, one job per seed, run one after another on that worker.
"""

from .server_client import ServerBackend, ServerWorker
from .worker_client import BackendWorker, GenerationJob

_worker = None
_batch = None


class Batch:
    """The jobs of one Generate press: ``runs`` is a list of (seed, params, out_dir), one per variation.

    One job runs at a time. ``start_next`` starts the next one when whoever follows the batch (the Generate
    operator) has handled the last; none starts after ``cancel`` or after a job that did not finish well, so
    cancelling stops the batch: the running job is cancelled (before its next step) and the rest never start.
    hang_timeout_s: as for GenerationJob.
    """

    def __init__(self, worker, runs, hang_timeout_s=600.0):
        self.worker = worker
        self.runs = list(runs)
        self.hang_timeout_s = hang_timeout_s
        self.job = None  # the job started last
        self.started = 0  # how many jobs have been started
        self.cancelled = False

    @property
    def count(self):
        """How many variations the batch was asked for."""
        return len(self.runs)

    @property
    def seed(self):
        """The seed of the job started last (None before the first)."""
        return self.runs[self.started - 1][0] if self.started else None

    @property
    def finished(self):
        """True once no job runs and none will start: all done, cancelled, or stopped by a failed job."""
        if self.job is None:
            return True
        return self.job.finished and (self.cancelled or self.started >= self.count or self.job.state != "done")

    def start_next(self):
        """Start the next variation's job and return it (it may already have failed to start); None when the
        batch is over (every job started, cancelled, or the last job failed or was cancelled)."""
        if self.cancelled or self.started >= self.count or (self.job is not None and self.job.state != "done"):
            return None
        _, params, out_dir = self.runs[self.started]
        self.job = GenerationJob(self.worker, params, out_dir, self.hang_timeout_s)
        self.started += 1
        self.job.start()
        return self.job

    def cancel(self):
        """Stop the batch: the running job is asked to stop before its next step, and no other job starts."""
        self.cancelled = True
        if self.job is not None:
            self.job.cancel()

    @property
    def status_text(self):
        """The running job's status, after which variation it is when there are several:
        "Variation 2/4 · Denoising 3/10"."""
        text = self.job.status_text if self.job is not None else "Starting"
        return f"Variation {self.started}/{self.count} · {text}" if self.count > 1 else text


def get_worker(command, env, cwd, log_path, remote=None):
    """The shared worker for ``command``; a new one when the command changed (another interpreter, or another
    host: ``remote`` is the ``backend_command.RemoteBackend`` the command reaches over ssh, None when local), or
    for a ``server_client.ServerBackend`` (Backend = Server; ``command`` and ``env`` are None) its ``ServerWorker``."""
    global _worker
    if isinstance(remote, ServerBackend):
        if _worker is None or _worker.remote != remote:
            if _worker is not None:
                _worker.stop()
            _worker = ServerWorker(remote, log_path)
        return _worker
    if _worker is None or _worker.command != list(command) or _worker.remote != remote:
        if _worker is not None:
            _worker.stop()
        _worker = BackendWorker(command, env, cwd, log_path, remote)
    _worker.env = env  # e.g. Blender's online access may have changed since it was made
    return _worker


def start_batch(worker, runs, hang_timeout_s=600.0):
    """Make a Batch of ``runs`` ((seed, params, out_dir) each) on ``worker`` the current one and start its first
    job; returns the batch."""
    global _batch
    _batch = Batch(worker, runs, hang_timeout_s)
    _batch.start_next()
    return _batch


def current_batch():
    """The batch started last (running or finished), or None."""
    return _batch


def current_job():
    """The job started last (running or finished), or None."""
    return _batch.job if _batch is not None else None


def is_busy():
    """True while a batch has a job running or another to start."""
    return _batch is not None and not _batch.finished


def cancel():
    """Stop the current batch (``Batch.cancel``); nothing when none runs."""
    if is_busy():
        _batch.cancel()


def shutdown():
    """Stop the worker (when the add-on is disabled or Blender quits)."""
    global _worker, _batch
    if _worker is not None:
        _worker.stop()
    _worker, _batch = None, None
