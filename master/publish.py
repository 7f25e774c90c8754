"""Publishing a job's pages on this instance's site: the one way the master calls sitegen.

:func:`publish_pages` publishes one job now (sitegen's incremental :func:`~sitegen.publish_job`);
:class:`SitePublisher`, run by :class:`~master.server.MasterServer`, calls it off the request path
when a job starts (its log page tails ``output.yaml`` live) and when it finishes. A failure is
logged, not raised: the job is recorded, and ``pumice-site build`` catches up.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from master import diskfull, events
from master.instance import current
from sitegen import publish_job

log = logging.getLogger("pumice.server")


def publish_pages(job_id: int, *, stop: threading.Event | None = None) -> None:
    """Publish the job's pages now. With ``stop``, a full disk is waited out (until ``stop`` is set):
    the pages are published once there is space; without it, a full disk is logged like any failure."""
    instance = current()
    if instance.site_dir is None:
        return
    try:
        if stop is None:
            publish_job(instance.store.root, instance.site_dir, job_id, instance=instance.name,
                        base_url=instance.url)
        else:
            diskfull.retry(publish_job, instance.store.root, instance.site_dir, job_id, stop=stop,
                           what=f"publishing job {job_id}'s pages", instance=instance.name, base_url=instance.url)
    except Exception as exc:
        if stop is not None and diskfull.is_storage_error(exc):
            diskfull.report(exc, f"publishing job {job_id}'s pages (given up: the master stops)")
        else:
            log.exception("publishing job %s failed; 'pumice-site build' will catch up", job_id)


class SitePublisher:
    """Publishes a job's pages when it starts and when it finishes (sitegen, incremental), off the
    request path."""

    def __init__(self) -> None:
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        # a running job too: its log page tails output.yaml live
        # job_notified: a notification was delivered or given up (its attempts are on the page)
        if event in ("job_started", "job_finished", "job_notified"):
            for job_id in data.get("job_ids", ()):
                self._queue.put(job_id)

    def _run(self) -> None:
        while (job_id := self._queue.get()) is not None:
            publish_pages(job_id, stop=self._stop)

    def start(self) -> None:
        events.subscribe(self.on_event)
        self._thread = threading.Thread(target=self._run, name="pumice-site", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        events.unsubscribe(self.on_event)
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)
