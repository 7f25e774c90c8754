"""Errors of the service layer; each front door (REST, XML-RPC, CLI) maps them to its own form.

Every error carries the HTTP status it means, a message a user can act on, and for job definitions
the list of faults (YAML path, line, message).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ServiceError(Exception):
    """A request the master refuses; ``status`` is the HTTP status it maps to."""

    status = 400

    def __init__(self, message: str, faults: Iterable[Any] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.faults = list(faults)

    def to_dict(self) -> dict:
        """The JSON body: ``{"error": message, "faults": [{"path", "line", "message"}]}``."""
        return {
            "error": self.message,
            "faults": [fault.to_dict() for fault in self.faults],
        }


class Invalid(ServiceError):
    """Bad input: a job definition with faults, an unknown name in a field, a malformed value."""

    status = 400


class Unauthorized(ServiceError):
    """No valid credentials (an unknown or malformed token)."""

    status = 401


class Forbidden(ServiceError):
    """Valid credentials, but not allowed (not an admin, not the submitter)."""

    status = 403


class NotFound(ServiceError):
    """No such job, device, device type, worker or user (or one the user may not see)."""

    status = 404


class Conflict(ServiceError):
    """The object exists already, or its state does not allow the operation."""

    status = 409


class TooLarge(ServiceError):
    """A request body or definition over the size limit."""

    status = 413


class StorageFull(ServiceError):
    """The master's data directory (or its database) is full: the request could not be recorded
    (see :mod:`master.diskfull`); it may be sent again once space is freed."""

    status = 507


class InternalError(ServiceError):
    """A failure of the master itself (a bug): its details are in the master's log, not the reply."""

    status = 500
