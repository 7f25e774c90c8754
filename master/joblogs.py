"""The jobs' logs as the broker receives them: numbered LOG batches into the artifact store, their
results into the database, acknowledged in a group commit.

A LOG batch is appended to the job's ``output.yaml`` (with its line index) by line number: a batch
the store already has is acknowledged and dropped, a gap is answered with ``rewind``. The
``results`` records in new lines (:func:`results.record.results_in_lines`) go to the database. A
batch is acknowledged only once its lines are durable (one fsync per log per burst of messages)
and its results committed. After a crash the file is the truth: results found in it but not in the
database are inserted when the job's stream is reopened, so nothing is lost or doubled.

A full disk (or database): a batch that cannot be written is cut back out of the log and not
acknowledged; the job's later batches are answered with the lines the master holds, without a
rewind, until the agent, backing off, sends the refused one again. Results the database refuses
wait in memory, and the batches they came with stay unacknowledged (:mod:`master.diskfull`).

No sockets here: :class:`JobLogs` returns the replies, the broker sends them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.messages import Log, LogOk
from master import diskfull, jobs
from master.db import connection, db
from master.instance import current
from master.models import Job, TestCase, Worker
from results.logfile import LogFile
from results.record import Result, results_in_lines

log = logging.getLogger("pumice.broker")

#: job logs kept open at once (4 file descriptors each)
MAX_STREAMS = 256
#: threads that fsync the logs of a burst of LOG batches together
SYNC_THREADS = 16


@dataclass
class Stream:
    """The master's side of one job's log: its store file and what the database holds."""

    job_id: int
    worker: str
    logfile: LogFile
    lines: int
    results: int
    #: results of durable lines that the database does not hold yet (it was full): stored before
    #: the job's next acknowledgement
    unstored: list[Result] = field(default_factory=list)


class Unavailable(Exception):
    """A job's stream cannot be opened now (a full disk or database; reported): try again later."""


#: a reply for the broker to send: (socket, worker hostname, message)
Reply = tuple[Any, str, LogOk]


class JobLogs:
    """The open job streams and the LOG batches of the current burst, for one broker loop (not
    thread-safe: the loop's thread only). ``stats`` counts ``log_lines``, ``duplicate_lines`` and
    ``results``."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.streams: dict[int, Stream] = {}
        #: LOG batches handled in this burst: their logs are made durable and their results
        #: committed together (a group commit), then they are acknowledged
        self._staged_results: dict[int, list[Result]] = {}
        self._staged_acks: list[Reply] = []
        self._unsynced: set[int] = set()
        #: jobs whose log could not be written (a full disk): their batches past the stored lines
        #: are not rewound (the agent resends from its last acknowledged line, backing off)
        self._blocked: set[int] = set()
        self._retry_results_at = 0.0
        self._syncer: ThreadPoolExecutor | None = None

    def blocked(self, job_id: int) -> bool:
        """Whether the job's log refused a write that its agent has not sent again yet."""
        return job_id in self._blocked

    def stream(self, job_id: int, hostname: str) -> Stream | None:
        """The job's log stream (opened, and its results made consistent, on first use); None if
        the job is not this worker's. Raises :class:`Unavailable` when the store or the database
        is full."""
        stream = self.streams.get(job_id)
        if stream is not None:
            return stream if stream.worker == hostname else None
        logfile: LogFile | None = None
        try:
            with connection():
                row = (Job.select(Job.id, Worker.hostname).join(Worker, on=(Job.worker == Worker.id))
                       .where(Job.id == job_id).tuples().first())
                if row is None or row[1] != hostname:
                    log.warning("worker %s sent the log of job %d, which is %s", hostname, job_id,
                                "unknown" if row is None else f"{row[1]}'s")
                    return None
                logfile = current().store.log(job_id)
                lines = logfile.count()
                in_db = TestCase.select().where(TestCase.job == job_id).count()
                found = results_in_lines(job_id, logfile.read(0, lines)) if lines else []
                if in_db < len(found):
                    # the master stopped between a log append and its results insert: catch up
                    jobs.append_results(job_id, found[in_db:])
                    log.warning("job %d: %d result(s) of the stored log were not in the database: added",
                                job_id, len(found) - in_db)
                elif in_db > len(found):
                    log.warning("job %d: the database holds %d results, its stored log %d", job_id, in_db,
                                len(found))
        except Exception as exc:
            if logfile is not None:
                logfile.close()
            if not diskfull.is_storage_error(exc):
                raise
            diskfull.report(exc, f"job {job_id}: opening its log")
            raise Unavailable(job_id) from exc
        stream = Stream(job_id, hostname, logfile, lines, max(in_db, len(found)))
        if len(self.streams) >= MAX_STREAMS:
            # file descriptors are finite: the oldest stream is closed (it reopens when needed)
            self.close(next(iter(self.streams)))
        self.streams[job_id] = stream
        return stream

    def close(self, job_id: int) -> None:
        """Close the job's stream (its results are taken from the store when it is reopened)."""
        stream = self.streams.pop(job_id, None)
        if stream is not None:
            self._staged_results.pop(job_id, None)
            if job_id in self._unsynced:  # durable before it is acknowledged, on reopening
                self._unsynced.discard(job_id)
                with contextlib.suppress(OSError):  # cut back: reopening counts its lines
                    stream.logfile.flush()
            stream.logfile.close()

    def forget(self, job_id: int) -> None:
        """The job ended: close its stream and forget a refused write."""
        self.close(job_id)
        self._blocked.discard(job_id)

    def close_all(self) -> None:
        if self._syncer is not None:
            self._syncer.shutdown()
            self._syncer = None
        for stream in self.streams.values():
            stream.logfile.close()
        self.streams.clear()

    def append(self, sock: Any, hostname: str, msg: Log) -> LogOk | None:
        """Store a LOG batch of ``hostname``. Returns the reply to send now, or None when the
        batch is acknowledged by :meth:`flush` (once its lines are durable and its results
        committed). A batch that cannot be stored is answered all the same (any message is a
        heartbeat), with the lines the master holds and no rewind: the agent resends on its own,
        backing off."""
        try:
            stream = self.stream(msg.job_id, hostname)
        except Unavailable:  # the agent sends the batch again later
            return LogOk(job_id=msg.job_id, lines=0)
        if stream is None:  # not its job: acknowledge so that it stops, keep nothing
            return LogOk(job_id=msg.job_id, lines=msg.seq + len(msg.lines))
        have = stream.lines
        if msg.seq <= have:
            new = msg.lines[have - msg.seq:]
            self.stats.duplicate_lines += len(msg.lines) - len(new)
        elif msg.job_id in self._blocked:
            new = []  # after lines the disk refused: the agent sends those first
        else:  # a gap: have the missing lines resent
            return LogOk(job_id=msg.job_id, lines=have, rewind=True)
        if new:
            try:
                stream.lines = stream.logfile.append_lines(new)
            except ValueError as exc:
                log.error("job %d: log batch from %s refused: %s", msg.job_id, hostname, exc)
                return None
            except OSError as exc:  # cut back to the stored lines: the agent sends them again
                self._write_failed(stream, exc, "storing its log")
                if msg.job_id not in self.streams:  # not even cut back: counted again on the next batch
                    return LogOk(job_id=msg.job_id, lines=0)
            else:
                self._blocked.discard(msg.job_id)
                self._unsynced.add(msg.job_id)
                self.stats.log_lines += len(new)
                found = results_in_lines(msg.job_id, new)
                if found:
                    self._staged_results.setdefault(msg.job_id, []).extend(found)
        self._staged_acks.append((sock, hostname, LogOk(job_id=msg.job_id, lines=stream.lines)))
        return None

    def flush(self) -> list[Reply]:
        """The group commit of the LOG batches appended since the last call: fsync each log that
        grew, commit the results of its new lines (with any the database refused before), then
        return their acknowledgements. A log that cannot be made durable is cut back to its last
        durable line and its results dropped; results the database refuses wait in their stream.
        Either way those jobs' batches are not acknowledged (only answered, with 0 lines): the
        agents send them again."""
        results, acks, unsynced = self._staged_results, self._staged_acks, self._unsynced
        now = time.monotonic()
        waiting = [s for s in self.streams.values() if s.unstored] if now >= self._retry_results_at else []
        if not results and not acks and not unsynced and not waiting:
            return []
        self._staged_results, self._staged_acks, self._unsynced = {}, [], set()
        # a stream closed meanwhile was made durable then, or cut back
        failed = {job_id for job_id in unsynced if job_id not in self.streams}
        synced = [self.streams[job_id] for job_id in unsynced if job_id in self.streams]
        for stream, error in zip(synced, self._sync(synced), strict=True):
            if error is not None:
                self._write_failed(stream, error, "making its log durable")
                failed.add(stream.job_id)
        for job_id, found in results.items():
            if job_id not in failed and job_id in self.streams:
                self.streams[job_id].unstored.extend(found)
        pending = {s.job_id: s for s in self.streams.values() if s.unstored}
        if pending:
            try:
                with db.atomic():
                    for job_id, stream in pending.items():
                        jobs.append_results(job_id, stream.unstored)
            except Exception as exc:
                if diskfull.is_storage_error(exc):
                    diskfull.report(exc, f"storing the results of job(s) {', '.join(map(str, pending))}")
                else:
                    log.exception("storing the results of jobs %s failed; they are taken again from the log",
                                  ", ".join(map(str, pending)))
                    for job_id in pending:  # reopened from the store, which has every line
                        self.close(job_id)
                self._retry_results_at = now + 1.0
                failed.update(pending)
            else:
                for stream in pending.values():
                    stream.results += len(stream.unstored)
                    self.stats.results += len(stream.unstored)
                    stream.unstored = []
        if unsynced and not failed:
            diskfull.recovered()
        replies: list[Reply] = []
        heard: set[tuple[str, int]] = set()
        for sock, hostname, ack in acks:
            if ack.job_id not in failed:
                replies.append((sock, hostname, ack))
            elif (hostname, ack.job_id) not in heard:  # answered, not acknowledged: a heartbeat
                heard.add((hostname, ack.job_id))
                replies.append((sock, hostname, LogOk(job_id=ack.job_id, lines=0)))
        return replies

    def _sync(self, streams: list[Stream]) -> list[OSError | None]:
        """fsync the streams' logs (with their index): in parallel, so that the filesystem
        commits them together (one by one, a hundred logs cost a hundred journal commits)."""

        def sync(stream: Stream) -> OSError | None:
            try:
                stream.logfile.flush()
            except OSError as exc:
                return exc
            return None

        if len(streams) < 2:
            return [sync(stream) for stream in streams]
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="pumice-broker-fsync")
        return list(self._syncer.map(sync, streams))

    def _write_failed(self, stream: Stream, exc: OSError, what: str) -> None:
        """A write to the job's log failed (the log was cut back): report it (once a minute) and
        store none of the job's next batches until its agent sends the missing ones again."""
        diskfull.report(exc, f"job {stream.job_id}: {what}")
        self._blocked.add(stream.job_id)
        lines = getattr(exc, "lines", None)
        if lines is None:  # not even cut back: the store is the truth, read it again next time
            self.close(stream.job_id)
        else:
            stream.lines = lines
