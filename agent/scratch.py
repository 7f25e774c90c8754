"""A job's scratch directories on the worker, named ``pumice-<job id>-<random>``: one under the
dispatcher configuration's ``tmp_dir`` (downloads, overlays) and, for a TFTP deploy, one under its
``tftp_root`` (what the bootloader fetches).

pumice-run removes them at its end. When it could not (killed outright), the agent daemon sweeps
them (:func:`sweep`), so that a lab's disks do not fill up with the kernels of dead jobs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

#: where TFTP files go when the dispatcher configuration names no ``tftp_root``
DEFAULT_TFTP_ROOT = "/srv/tftp"


def tftp_root(dispatcher: Mapping) -> Path:
    """The worker's TFTP root: the dispatcher configuration's ``tftp_root``, else /srv/tftp."""
    return Path(dispatcher.get("tftp_root") or DEFAULT_TFTP_ROOT)


def make(job_id: object, base: Path | str | None) -> Path:
    """A new scratch directory of job ``job_id`` under ``base`` (None: the system's temporary
    directory), readable by its owner only."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"pumice-{job_id}-", dir=base))


def sweep(job_id: int, dispatcher: Mapping) -> list[Path]:
    """Remove the scratch directories job ``job_id`` left under ``tmp_dir`` and ``tftp_root``;
    return them. Symbolic links and files of that name are left alone."""
    import tempfile

    removed = []
    for base in (Path(dispatcher.get("tmp_dir") or tempfile.gettempdir()), tftp_root(dispatcher)):
        try:
            found = sorted(base.glob(f"pumice-{int(job_id)}-*"))
        except OSError:
            continue
        for path in found:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def remove_tree(directory: Path, keep_top: bool = False) -> None:
    """Remove an extracted tree (never following its links; directories without write or search
    permission are opened up first). ``keep_top`` empties ``directory`` but keeps it."""
    directory = Path(directory)
    if not directory.exists() or directory.is_symlink():
        return

    def retry(function: Callable, path: str, _exc: object) -> None:
        # a directory of mode 0555 (or 0000) in the tree: open it up, then try again
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            function(path)
        except FileNotFoundError:
            pass

    if keep_top:
        for entry in os.scandir(directory):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, onerror=retry)
            else:
                os.unlink(entry.path)
    else:
        shutil.rmtree(directory, onerror=retry)
