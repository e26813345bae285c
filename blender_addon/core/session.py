"""The add-on's single backend worker and the job running on it, shared by operators and panels.

Plain Python (no bpy). One worker process per Blender session, kept warm between jobs (unless the
preferences say otherwise) and replaced when its interpreter changes or it has died.
"""

from .worker_client import BackendWorker, GenerationJob

_worker = None
_job = None


def get_worker(command, env, cwd, log_path):
    """The shared worker for ``command``; a new one when the command changed (another interpreter)."""
    global _worker
    if _worker is None or _worker.command != list(command):
        if _worker is not None:
            _worker.stop()
        _worker = BackendWorker(command, env, cwd, log_path)
    _worker.env = env  # e.g. Blender's online access may have changed since it was made
    return _worker


def start_job(worker, params, out_dir, hang_timeout_s=600.0):
    """Start a generation on ``worker`` and make it the current job; returns it (maybe already failed).

    hang_timeout_s: seconds without any event after which the job is declared hung (see GenerationJob).
    """
    global _job
    _job = GenerationJob(worker, params, out_dir, hang_timeout_s)
    _job.start()
    return _job


def current_job():
    """The job started last (running or finished), or None."""
    return _job


def is_busy():
    """True while a job is running."""
    return _job is not None and not _job.finished


def shutdown():
    """Stop the worker (when the add-on is disabled or Blender quits)."""
    global _worker, _job
    if _worker is not None:
        _worker.stop()
    _worker, _job = None, None
