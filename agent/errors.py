"""The error classes of a job and what each means for the job and the device.

The final ``lava/job`` result is ``fail`` whenever one of these ends the job; a failing test case never
does. ``error_type`` is the name LAVA users see in results and failure comments.
"""

from __future__ import annotations


class PumiceError(Exception):
    """Base of every error that ends a job."""

    error_type = "Unknown"
    #: the job's health when this error ends it
    health = "Incomplete"


class InfrastructureError(PumiceError):
    """The lab failed: a download server, a power switch, a console, a tool on the worker."""

    error_type = "Infrastructure"


class ConfigurationError(PumiceError):
    """The device configuration cannot run this job (a missing command, a bad template)."""

    error_type = "Configuration"


class JobError(PumiceError):
    """The job asked for something that cannot work: a bad URL, a checksum mismatch, wrong prompts."""

    error_type = "Job"


class TestError(PumiceError):
    """The test itself broke the run (e.g. ``lava-test-raise``, the board hung during a test)."""

    __test__ = False  # not a pytest test class, despite the name

    error_type = "Test"


class JobTimeout(JobError):
    """An action ran past its deadline (a Job error, as in LAVA)."""


class Canceled(PumiceError):
    """The job was canceled (SIGTERM to the runner, CANCEL from the master)."""

    error_type = "Canceled"
    health = "Canceled"


class Bug(PumiceError):
    """Something Pumice did not expect: a bug in Pumice, never the user's fault."""

    error_type = "Bug"


#: exit status of ``pumice-run`` for each job health
EXIT_STATUS = {"Complete": 0, "Incomplete": 1, "Canceled": 2}


class Fault:
    """One thing wrong with a job definition: where (YAML path and line) and what."""

    __slots__ = ("path", "message", "line")

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path = path
        self.message = message
        self.line = line

    def __str__(self) -> str:
        where = self.path or "job"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return f"Fault({self.path!r}, {self.message!r}, {self.line!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fault) and (self.path, self.message, self.line) == (
            other.path, other.message, other.line)

    def __hash__(self) -> int:
        return hash((self.path, self.message, self.line))

    def to_dict(self) -> dict:
        return {"path": self.path, "line": self.line, "message": self.message}


class JobDefinitionError(JobError):
    """The job definition is invalid; ``faults`` says every place that is wrong."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = list(faults)
        super().__init__("; ".join(str(f) for f in self.faults) or "invalid job definition")
