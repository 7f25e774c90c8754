"""Publishing a job's pages on this instance's site: the one way the master calls sitegen.

:func:`publish_pages` publishes one job now (sitegen's incremental :func:`~sitegen.publish_job`);
:class:`SitePublisher`, run by :class:`~master.server.MasterServer`, calls it off the request path
when a job starts (its log page tails ``output.yaml`` live) and when it finishes. A failure is
logged, not raised: the job is recorded, and ``pumice-site build`` catches up.

:class:`LabPublisher` republishes the lab-now page (and the pages of the devices, device types and
workers that changed) after any job, device or worker change: its event listener only notes what
changed, so the scheduler and log ingestion never wait; a burst of events is one publish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from master import diskfull, events
from master.db import connection
from master.instance import current
from sitegen import publish_job, publish_lab

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


#: how long the lab-now publisher waits before trying again after a storage failure (seconds)
STORAGE_RETRY = 5.0
#: events that change what the lab-now page shows
LAB_EVENTS = frozenset({"job_submitted", "job_scheduled", "job_started", "job_canceling", "job_finished",
                        "device_freed", "device_changed", "worker_online", "worker_offline", "worker_changed",
                        "lab_changed"})
#: how long a publish waits for more events of the same burst
COALESCE = 0.05


class LabPublisher:
    """Republishes the lab-now page within a second of a change, coalescing bursts, off every loop."""

    def __init__(self, coalesce: float = COALESCE) -> None:
        self.coalesce = coalesce
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._devices: set[str] = set()
        self._workers: set[str] = set()
        self._all_pages = True  # at start: every device, type and worker page once
        self._thread: threading.Thread | None = None

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event not in LAB_EVENTS:
            return
        with self._lock:
            if event in ("device_changed", "lab_changed"):
                if data.get("devices"):
                    self._devices.update(map(str, data["devices"]))
                else:
                    self._all_pages = True
            elif event.startswith("worker_"):
                self._workers.update(map(str, data.get("workers") or ()))
        self._wake.set()

    def publish_once(self) -> None:
        """Publish the lab now (and the pages noted since the last publish)."""
        from master.labnow import lab_model

        with self._lock:
            devices, workers, everything = self._devices, self._workers, self._all_pages
            self._devices, self._workers, self._all_pages = set(), set(), False
        instance = current()
        if instance.site_dir is None:
            return
        with connection():
            lab = lab_model()
        lab["instance"] = instance.name
        types: set[str] = set()
        if everything:
            devices = {str(d["hostname"]) for d in lab["devices"]}
            workers = {str(w["hostname"]) for w in lab["workers"]}
            types = {str(t["name"]) for t in lab["device_types"]}
        else:
            types = {str(d["device_type"]) for d in lab["devices"] if d["hostname"] in devices and d["device_type"]}
        publish_lab(instance.store.root, instance.site_dir, lab, instance=instance.name, base_url=instance.url,
                    devices=devices, device_types=types, workers=workers)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            time.sleep(self.coalesce)
            self._wake.clear()
            try:
                self.publish_once()
            except Exception as exc:
                with self._lock:  # what was noted is published by the next attempt
                    self._all_pages = True
                if diskfull.is_storage_error(exc):  # a full disk: said once a minute, retried in a while
                    diskfull.report(exc, "publishing the lab-now page (retried)")
                    self._stop.wait(STORAGE_RETRY)
                    self._wake.set()
                else:
                    log.exception("publishing the lab-now page failed; the next change retries")

    def start(self) -> None:
        events.subscribe(self.on_event)
        self._wake.set()
        self._thread = threading.Thread(target=self._run, name="pumice-lab-now", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        events.unsubscribe(self.on_event)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
