"""The running master: the REST API on waitress (threads), the scheduler thread, the site publisher,
the validator processes that check submitted pipelines (:class:`master.validation.ValidatorPool`).

``MasterServer(...).start()`` runs everything in background threads (tests, tools);
``serve_forever()`` is ``pumice-master serve``. The ZeroMQ broker (:mod:`master.broker`), when
given, is started and stopped with the scheduler; it works through :mod:`master.events` and the
service layer.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel

from master.api import make_app
from master.broker import Broker
from master.instance import current
from master.publish import LabPublisher, SitePublisher
from master.scheduler import Scheduler
from master.validation import ValidatorPool, default_validators

log = logging.getLogger("pumice.server")


class _Channel(HTTPChannel):
    """waitress's HTTP channel without its busy loop: while a request thread holds the channel's
    output lock (it is sending its response), the poll loop used to find the socket writable, fail
    to take the lock and poll again at once, 15 to 30 times a request, keeping the interpreter lock
    from the very thread it waited for. The thread pulls the loop's trigger whenever it leaves
    output unsent (and after every request), so the loop need not watch the socket meanwhile."""

    def writable(self) -> bool:
        if not self.outbuf_lock.acquire(blocking=False):
            return False
        try:
            return bool(super().writable())
        finally:
            self.outbuf_lock.release()


class MasterServer:
    """The REST API on ``host:port`` (port 0: any free port) plus the scheduler, the site publisher
    and ``validators`` validator processes (None: :func:`~master.validation.default_validators`;
    0: submissions are validated in the HTTP threads)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, *, threads: int = 8,
                 scheduler: bool = True, scheduler_interval: float = 20.0, publish_site: bool = True,
                 validators: int | None = None, broker: Broker | None = None, notify: bool = True,
                 event_socket: str = "") -> None:
        #: the ZeroMQ side (bound by the caller, which reports a bad endpoint or key first)
        self.broker = broker
        self.scheduler = Scheduler(interval=scheduler_interval) if scheduler else None
        from master.notify import settings as notify_settings
        from master.outbox import Outbox

        # the notification sender (master.outbox); held (--notify-hold): the outbox only fills
        self.outbox = Outbox() if notify and notify_settings().deliver else None
        from master.publisher import EventPublisher

        # LAVA's event stream (master.publisher) on a PUB socket of its own, when configured
        self.events = EventPublisher(event_socket) if event_socket else None
        self.publisher = SitePublisher() if publish_site else None
        self.lab_publisher = LabPublisher() if publish_site else None
        processes = default_validators() if validators is None else validators
        self.validators = ValidatorPool(processes) if processes > 0 else None
        self._server = waitress.create_server(
            make_app(), host=host, port=port, threads=threads, ident="pumice",
            # the API refuses bodies over max_body itself, with a JSON error; waitress only stops
            # absurd ones (its own 413 is plain text)
            max_request_body_size=max(64 << 20, 4 * current().max_body), clear_untrusted_proxy_headers=True)
        self._server.channel_class = _Channel
        self.host = host
        self.port = self._server.effective_port
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _start_helpers(self) -> None:
        if self.validators is not None:
            self.validators.start()
        if self.scheduler:
            self.scheduler.start()
        if self.publisher:
            self.publisher.start()
        if self.lab_publisher:
            self.lab_publisher.start()
        if self.broker is not None:
            self.broker.start()
        if self.outbox:
            self.outbox.start()
        if self.events:
            self.events.start()
            current().event_socket = (self.events.bound if self.events.endpoint.endswith(":*")
                                      else self.events.endpoint)

    def start(self) -> MasterServer:
        """Serve in background threads; returns at once."""
        self._start_helpers()
        self._thread = threading.Thread(target=self._run, name="pumice-http", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._server.run()
        except OSError:
            if not self._stopping:  # closing the socket under the poll loop is how it stops
                raise

    def stop(self) -> None:
        """Stop serving; the scheduler and the site publisher stop even if the HTTP side fails to."""
        if self._stopping:
            return
        self._stopping = True
        try:
            if self._thread is not None:
                # close every channel from inside the poll loop (a thunk run by its trigger): the loop
                # then finds its map empty and returns; closing sockets from here would race its poll
                server_map = self._server._map
                # OSError: the loop already closed its trigger, it is stopping or stopped
                with contextlib.suppress(OSError):
                    self._server.trigger.pull_trigger(lambda: wasyncore.close_all(server_map))
                self._thread.join(10)
            else:
                self._server.close()
        finally:
            self._stop_helpers()
            self._server.task_dispatcher.shutdown()

    def _stop_helpers(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.scheduler:
            self.scheduler.stop()
        if self.publisher:
            self.publisher.stop()
        if self.lab_publisher:
            self.lab_publisher.stop()
        if self.outbox:
            self.outbox.stop()
        if self.events:
            self.events.stop()
        if self.validators is not None:
            self.validators.stop()

    def serve_forever(self) -> None:
        """Serve in this thread until SIGTERM or SIGINT."""
        self._start_helpers()

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        log.info("pumice master listening on %s (data %s)", self.url, current().data_dir)
        try:
            self._server.run()
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            self._server.close()
            self._stop_helpers()
