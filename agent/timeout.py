"""Deadlines on the monotonic clock (no SIGALRM) and LAVA's duration format."""

from __future__ import annotations

import time
from typing import NamedTuple

from agent.errors import JobError, JobTimeout

#: the seconds in each unit of a LAVA duration
UNIT_SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def parse_duration(value: dict | int | float, where: str = "timeout") -> float:
    """Seconds in a LAVA duration (``{minutes: 5}``, ``{hours: 1, seconds: 30}``) or a bare number."""
    if isinstance(value, bool):
        raise JobError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, dict) and value and set(value) <= set(UNIT_SECONDS):
        seconds = 0.0
        for unit, amount in value.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise JobError(f"{where}.{unit}: expected a number, got {amount!r}")
            seconds += amount * UNIT_SECONDS[unit]
    else:
        raise JobError(f"{where}: expected a mapping of {', '.join(UNIT_SECONDS)}, got {value!r}")
    if seconds <= 0:
        raise JobError(f"{where}: a duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``HH:MM:SS`` as LAVA prints timeouts in ``start:`` lines."""
    seconds = int(round(seconds))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Deadline(NamedTuple):
    """A point on the monotonic clock by which something must be done, and whose it is.
    (Immutable; a named tuple, cheaper than a dataclass to build when pumice-run starts.)"""

    at: float
    owner: str = "job"

    @classmethod
    def after(cls, seconds: float, owner: str = "job", parent: Deadline | None = None) -> Deadline:
        """A deadline ``seconds`` from now, never later than ``parent``'s."""
        at = time.monotonic() + seconds
        if parent is not None and parent.at < at:
            return parent
        return cls(at, owner)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def check(self) -> None:
        """Raise JobTimeout when the deadline has passed."""
        if self.expired():
            raise JobTimeout(f"{self.owner} timed out")

    def within(self, seconds: float) -> float:
        """``seconds``, capped to what is left: the timeout to give one blocking call."""
        return min(seconds, self.remaining())
