"""The lab-now page: running and queued jobs (with why each waits), devices that need attention and
workers, "as of" a time, from a model of the lab the master hands over (sitegen reads no master module).

:func:`sitegen.build.publish_lab` is what the master calls on every job, device or worker change (coalesced): it
writes ``data/lab.json`` (the model), ``lab/index.html`` and ``lab/now.txt``, the stamp an open lab-now
page polls to reload itself; with ``devices``/``device_types``/``workers`` it also re-renders those
pages (a health change shows on the device's page too). A full build renders the page from
``data/lab.json`` when the master wrote one, else from the store's ``lab.yaml`` (no queue then).

Lab pages have their own lock: publishing them never waits for a job's pages (a big log) to render.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

#: device healths the page lists as needing attention (LAVA's names)
ATTENTION = ("Bad", "Maintenance", "Looping")


@contextmanager
def site_file_lock(site_root: Path, name: str) -> Iterator[None]:
    """An exclusive lock on the site's lock file ``name`` (between threads and processes)."""
    site_root.mkdir(parents=True, exist_ok=True)
    with open(site_root / name, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lab_lock(site_root: Path) -> AbstractContextManager[None]:
    """The lab pages' own lock (they never wait behind a job's publish)."""
    return site_file_lock(site_root, ".pumice-lab.lock")


def attention(lab: dict) -> list[tuple[dict, str]]:
    """The devices that need a look and why: Bad / Maintenance / Looping, or Offline (their worker is)."""
    workers = {w.get("hostname"): w for w in lab.get("workers") or () if isinstance(w, dict)}
    out = []
    for device in lab.get("devices") or ():
        if not isinstance(device, dict) or device.get("health") == "Retired":
            continue
        worker = workers.get(device.get("worker"))
        if device.get("health") in ATTENTION:
            out.append((device, str(device["health"])))
        elif worker is None or worker.get("state") != "Online":
            out.append((device, "Offline"))
    return out


def render_lab(site: Any, lab: dict) -> None:
    """Write lab/index.html and lab/now.txt from ``lab`` (the master's model, or lab.yaml)."""
    devices_per_worker = Counter(d.get("worker") for d in lab.get("devices") or () if isinstance(d, dict))
    # what the page shows, hashed: an open page reloads when it changes, never for nothing
    stamp = hashlib.sha256(json.dumps(lab, sort_keys=True, default=str).encode()).hexdigest()[:16]
    site.page(
        "lab/index.html",
        "lab.html",
        lab=lab,
        stamp=stamp,
        running=list(lab.get("running") or ()),
        queued=list(lab.get("queued") or ()),
        attention=attention(lab),
        workers=[(w, devices_per_worker[w.get("hostname")]) for w in lab.get("workers") or () if isinstance(w, dict)],
    )
    site.writer.write("lab/now.txt", stamp + "\n")


def load_lab(site: Any) -> dict:
    """The lab model last published by the master (``data/lab.json``), else the store's ``lab.yaml``."""
    try:
        data = json.loads((site.root / "data" / "lab.json").read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    except (FileNotFoundError, ValueError):
        pass
    return site.store.read_lab()
