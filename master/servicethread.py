"""The broker's service thread, and the job state changes it records.

A job's start and end, a worker's presence: service-layer calls that may take long (a job's end
writes its bundle, lab.yaml...) or wait out a full disk or database (:mod:`master.diskfull`). They
run in order on a thread of their own, so that the broker's loop and its log streams never wait
for them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from master import diskfull, jobs
from master.db import connection
from master.errors import ServiceError
from master.models import Job, Worker

log = logging.getLogger("pumice.broker")


class ServiceThread:
    """Runs calls in the order they are submitted, each in a database connection; a call met by a
    full disk or database is tried again until it passes (and the ones after it wait), or until
    ``stop`` is set."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop_event = stop
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pumice-broker-services", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the calls queued so far, then end the thread (idempotent)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the thread, after the calls queued before it (inline when the
        thread does not run: a broker driven by ``loop_once()``)."""
        if self._thread is None:
            self._call(func, args)
        else:
            self._queue.put((func, args))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._call(*item)

    def _call(self, func: Callable[..., Any], args: tuple) -> None:
        name = str(getattr(func, "__name__", func)).lstrip("_")
        try:
            with connection():
                # a state change met by a full disk waits for space (and the ones after it, in order)
                diskfull.retry(func, *args, what=f"broker: {name}", stop=self.stop_event)
        except Exception as exc:
            if diskfull.is_storage_error(exc):
                diskfull.report(exc, f"broker: {name} (given up: the broker stops)")
            else:
                log.exception("broker: %s%r failed", name, args)


def record_start(hostname: str, job_id: int, sent: float) -> None:
    """The worker runs the job (it acknowledged START, sent at monotonic time ``sent``):
    Scheduled -> Running."""
    job = Job.get_or_none(Job.id == job_id)
    owner = Worker.get_by_id(job.worker_id).hostname if job and job.worker_id else None
    if owner != hostname:
        log.warning("worker %s acknowledged job %d, which is not its job", hostname, job_id)
        return
    if jobs.job_started(job_id):
        log.info("job %d running on %s%s", job_id, hostname,
                 f" ({(time.monotonic() - sent) * 1000:.1f} ms after START)" if sent else "")


def record_end(job_id: int, health: str, error: str | None, error_type: str | None, stop: threading.Event) -> None:
    """The job ended: :func:`master.jobs.record_end` then :func:`~master.jobs.publish_end`. A full
    disk or database is waited out (until ``stop``): END is acknowledged only once the end is
    recorded and published."""
    what = f"job {job_id}: recording its end ({health})"
    try:
        end = diskfull.retry(jobs.record_end, job_id, health, error, error_type, what=what, stop=stop)
        if end is not None:
            diskfull.retry(jobs.publish_end, end, what=what, stop=stop)
            log.info("job %d ended %s%s", job_id, health, f" ({error_type}: {error})" if error else "")
    except ServiceError as exc:
        log.error("job %d: cannot record its end (%s): %s", job_id, health, exc.message)
