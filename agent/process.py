"""Child processes of a job: they never outlive the runner."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1
_libc = None


def die_with_parent() -> None:
    """In a child before exec: ask Linux to SIGKILL it when its parent dies, even by SIGKILL,
    so a killed ``pumice-run`` never leaves a QEMU or a telnet behind."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
