"""In-process events: the service layer announces what changed, loops (scheduler, broker) listen.

``publish("job_submitted", job_ids=[12])`` after the transaction commits; the scheduler subscribes
to wake at once instead of polling, the broker (to send START for ``job_scheduled`` and CANCEL for
``job_canceling``). A listener must be quick and must not raise: it only sets a flag or queues.

Events: job_submitted, job_scheduled, job_canceling, job_finished, device_freed, device_changed,
worker_online, lab_changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pumice.events")

Listener = Callable[[str, dict[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> None:
    """Call ``listener(event, data)`` for every event from now on."""
    with _lock:
        _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def publish(event: str, **data: Any) -> None:
    """Tell every listener that ``event`` happened (call after the change is committed)."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event, data)
        except Exception:  # a broken listener must not fail the request that published
            log.exception("event listener %r failed on %s", listener, event)
