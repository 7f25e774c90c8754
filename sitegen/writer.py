"""The write phase of a site build: atomic files, each path written at most once per build.

Pages are replaced with a rename so nginx never serves half a page; writing one path twice in a build
is a bug (two pages fighting for one URL) and raises at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("pumice.sitegen")


class DuplicatePathError(RuntimeError):
    """Two pages of one build tried to write the same file."""


class Writer:
    """Writes files under ``root``; refuses a second write to the same path in its lifetime."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.written: set[Path] = set()

    def _claim(self, rel: str) -> Path:
        path = self.root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"site path {rel!r} leaves the site root")
        if path in self.written:
            raise DuplicatePathError(f"{rel}: written twice in one build (two pages share one URL)")
        self.written.add(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, rel: str, content: str | bytes) -> Path:
        """Write ``content`` to ``root/rel`` atomically (UTF-8 for text)."""
        path = self._claim(rel)
        data = content.encode("utf-8") if isinstance(content, str) else content
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; nginx workers must read it
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def link(self, rel: str, source: Path) -> Path:
        """Publish ``source`` as ``root/rel``: a hard link when possible (free, and an append-only log
        stays live through it), else a copy; either way swapped in atomically."""
        path = self._claim(rel)
        try:
            if os.path.samefile(source, path):
                # already this very file: renaming a link over another link of the same file does
                # nothing (POSIX), which left the temporary link behind in every republished job
                return path
        except OSError:
            pass
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            try:
                # a link shares the file's mode: only link what the web server may already read
                if not os.stat(source).st_mode & 0o004:
                    raise PermissionError("not world-readable")
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
                os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
