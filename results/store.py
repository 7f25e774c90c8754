"""The artifact store: one directory per job, shared by the master (writer) and sitegen (reader).

Layout, keyed by the job id (the instance's sequence number)::

    STORE/jobs/<id>/job.yaml          the definition as submitted
    STORE/jobs/<id>/meta.yaml         the job's record (state, health, device, times...), rewritten atomically
    STORE/jobs/<id>/output.yaml       the log (LAVA output.yaml lines), with output.idx its line index
    STORE/jobs/<id>/results.yaml      the results bundle, written when the job finishes
    STORE/jobs/<id>/description.yaml  the pipeline the agent ran
    STORE/lab.yaml                    a snapshot of devices, device types and workers (for the site)

Deps: stdlib, pyyaml and results/ only, so sitegen can read a store without the master's database.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from results.fastyaml import SafeDumper
from results.logfile import LogFile


def _dump(data: dict) -> str:
    # libyaml's emitter when there: the master rewrites meta.yaml on every state change, for up
    # to a thousand jobs in one scheduling pass
    return yaml.dump(data, Dumper=SafeDumper, sort_keys=False, allow_unicode=True)

META_FIELDS = (
    "id", "name", "description", "submitter", "device_type", "device", "worker", "tags",
    "priority", "visibility", "state", "health", "submit_time", "start_time", "end_time",
    "failure_comment", "health_check", "source",
)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        if exc.filename is None:  # a full disk says where (buffered writes fail without a name)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        os.unlink(tmp)
        raise


class ArtifactStore:
    """The job directories under ``root``; every path a reader or writer needs comes from here."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: int | str) -> Path:
        return self.root / "jobs" / str(int(job_id))

    def job_ids(self) -> Iterator[int]:
        """Every job id in the store, in ascending order."""
        jobs = self.root / "jobs"
        if not jobs.is_dir():
            return iter(())
        return iter(sorted(int(p.name) for p in jobs.iterdir() if p.name.isdigit()))

    def log(self, job_id: int | str) -> LogFile:
        """The job's log file (created on first append)."""
        path = self.job_dir(job_id) / "output.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        return LogFile(path)

    def write_definition(self, job_id: int | str, definition: str) -> None:
        write_atomic(self.job_dir(job_id) / "job.yaml", definition)

    def write_meta(self, job_id: int | str, meta: dict) -> None:
        unknown = set(meta) - set(META_FIELDS)
        if unknown:
            raise ValueError(f"unknown job meta fields: {', '.join(sorted(unknown))}")
        write_atomic(self.job_dir(job_id) / "meta.yaml", _dump(meta))

    def read_meta(self, job_id: int | str) -> dict:
        return yaml.safe_load((self.job_dir(job_id) / "meta.yaml").read_text(encoding="utf-8")) or {}

    def write_file(self, job_id: int | str, name: str, text: str) -> None:
        """Write one of the job's YAML files (results.yaml, description.yaml) atomically."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad artifact name {name!r}")
        write_atomic(self.job_dir(job_id) / name, text)

    def read_file(self, job_id: int | str, name: str) -> str | None:
        path = self.job_dir(job_id) / name
        return path.read_text(encoding="utf-8") if path.exists() else None

    def write_lab(self, lab: dict) -> None:
        write_atomic(self.root / "lab.yaml", _dump(lab))

    def read_lab(self) -> dict:
        path = self.root / "lab.yaml"
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {} if path.exists() else {}
