"""This master instance: its data directory, database, artifact store and device-type templates.

Data directory layout (``pumice-master serve --data DIR``, default ``$PUMICE_DATA`` or
``/var/lib/pumice``)::

    DIR/pumice.db       SQLite database (WAL), unless --database postgresql://...
    DIR/store/          the artifact store (job definitions, meta, logs, bundles; lab.yaml)
    DIR/site/           the published static site
    DIR/device-types/   site-local device-type templates (override the packaged ones)

The service layer reads the configured instance through :func:`current`; :func:`open_instance`
sets everything up (tests and the CLI use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from master.db import open_database
from results.bounded import DEFAULT_LIMITS, Limits
from results.store import ArtifactStore

DEFAULT_DATA = "/var/lib/pumice"
#: the largest request body / job definition accepted (a LAVA job with inline tests is a few kB)
DEFAULT_MAX_BODY = DEFAULT_LIMITS.max_bytes


def default_data_dir() -> Path:
    return Path(os.environ.get("PUMICE_DATA") or DEFAULT_DATA)


@dataclass
class Instance:
    """What the service layer needs besides the database."""

    data_dir: Path
    store: ArtifactStore
    #: a master.devicetypes.DeviceTypes (created lazily: the renderer pulls in jinja2)
    device_types: Any = None
    name: str = "pumice"
    url: str = ""
    #: the bounds of what users send (``serve --max-body`` sets ``max_bytes``, ``--limit`` the others)
    limits: Limits = DEFAULT_LIMITS
    #: context variables a job may set besides LAVA's (``serve --context-variable``)
    context_variables: tuple[str, ...] = ()
    site_dir: Path | None = None
    #: the notification settings (a master.notify.NotifySettings; None: the defaults)
    notify: Any = None
    #: where LAVA's event stream is published (master.publisher; '' when it is not)
    event_socket: str = ""

    @property
    def max_body(self) -> int:
        """The largest request body, in bytes (the limit ``max_bytes``)."""
        return self.limits.max_bytes

    def job_url(self, job_id: int | str) -> str:
        """The public URL of a job's page on the published site ('' when no URL is configured)."""
        return f"{self.url.rstrip('/')}/jobs/{int(job_id)}/" if self.url else ""

    def renderer(self):
        """The device-type renderer, site-local templates first (``DIR/device-types``)."""
        if self.device_types is None:
            from master.devicetypes import DeviceTypes

            local = self.data_dir / "device-types"
            self.device_types = DeviceTypes(site_dir=local if local.is_dir() else None)
        return self.device_types


_current: Instance | None = None


def configure(instance: Instance) -> Instance:
    """Make ``instance`` the one the service layer uses."""
    global _current
    _current = instance
    return instance


def current() -> Instance:
    """The configured instance; a RuntimeError if :func:`open_instance` was not called."""
    if _current is None:
        raise RuntimeError("the master is not configured: call master.instance.open_instance() first")
    return _current


def open_instance(data_dir: str | os.PathLike | None = None, database: str | None = None, *,
                  migrate: bool = True, name: str = "pumice", url: str = "",
                  max_body: int | None = None, limits: Limits = DEFAULT_LIMITS,
                  device_types: Any = None, context_variables: tuple[str, ...] = ()) -> Instance:
    """Open the data directory (created if needed) and the database, apply migrations, configure.
    ``max_body`` (if given) replaces ``limits.max_bytes``."""
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    open_database(database or data / "pumice.db")
    if migrate:
        from master.migrations import migrate as apply_migrations

        apply_migrations()
    return configure(Instance(data_dir=data, store=ArtifactStore(data / "store"), device_types=device_types,
                              name=name, url=url, site_dir=data / "site", context_variables=context_variables,
                              limits=limits if max_body is None else limits.replace(max_bytes=max_body)))
