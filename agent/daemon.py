"""``pumice-agent``: the agent daemon on a lab box. It connects to the master, runs each job it is given
as a ``pumice-run`` subprocess in its own spool directory and streams the job's log back.

    pumice-agent --master tcp://HOST:5556 [--logger tcp://HOST:5555] --hostname NAME [--spool DIR]
                 [--join TOKEN --url http://HOST:8000]
                 [--master-cert master.key --worker-cert NAME.key_secret | --insecure-plain]
    pumice-agent create-certificate NAME [--directory DIR]

The connection is authenticated and encrypted with CURVE: the agent's keys are in ``SPOOL/keys``
(``master.key``, ``NAME.key_secret``), put there by its enrolment (``--join TOKEN``, see
:mod:`agent.enrolment`), or given with ``--master-cert`` and ``--worker-cert``. ``--insecure-plain``
connects without authentication, to a master that runs ``--insecure-plain`` too.

Settings come from the command line, else the environment (``PUMICE_MASTER_URL`` or LAVA's
``MASTER_URL``, ``PUMICE_LOGGER_URL`` or ``LOGGER_URL``, ``PUMICE_HOSTNAME``, ``PUMICE_SPOOL``,
``PUMICE_URL``, ``PUMICE_JOIN_TOKEN``, ``PUMICE_MASTER_CERT``, ``PUMICE_WORKER_CERT``,
``PUMICE_INSECURE_PLAIN``), else the config file (``--config``, default ``/etc/pumice/agent.yaml``:
the same names in lower case, ``master``, ``logger``, ``hostname``, ``spool``, ``url``, ``join``,
``master_cert``, ``worker_cert``, ``insecure_plain``, ``cancel_grace``). ``encrypt`` (CURVE was
optional once) is still accepted and changes nothing.

The agent knows nothing of its devices: each START carries the device YAML the master rendered.
Spool layout, one directory per job (``SPOOL/jobs/<id>/``): ``job.yaml``, ``device.yaml``,
``device-own.yaml`` (the device YAML without the job's context), ``dispatcher.yaml``, ``state.json``
(what the daemon must remember across its own restarts), ``runner.log`` (pumice-run's stderr) and
pumice-run's ``output.yaml``/``output.idx``, ``results.yaml``, ``description.yaml``. The log is
streamed by line number from ``output.yaml``, so a restarted daemon (or master) resumes where the
master's acknowledgements stopped. Lines (and END) the master does not acknowledge are sent again
after a wait that doubles from the heartbeat up to a minute (a master whose disk is full stores
nothing): they wait in the spool, not in memory.

If the daemon dies, its jobs' runners get SIGTERM (the board is powered off); the restarted
daemon reports those jobs Incomplete with an infrastructure error, after sending the rest of
their logs. The daemon imports neither yaml (unless a config file is read) nor master code, to stay
small on a Raspberry-Pi-class worker.

Its settings: :mod:`agent.config`; one job in the spool: :mod:`agent.spool`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import DEFAULT_CONFIG, DEFAULT_SPOOL, AgentConfig, build_config
from agent.enrolment import JoinError, join
from agent.messages import (
    JOB_FINISHED,
    JOB_RUNNING,
    JOB_UNKNOWN,
    Cancel,
    EndOk,
    Log,
    LogOk,
    Message,
    Start,
    StartOk,
    Status,
    StatusReply,
    Welcome,
)
from agent.spool import LocalJob, final_result, job_environment, prepare_runner_setup, runner_setup, start_time
from agent.transport import CertificateError, Transport, create_certificate

log = logging.getLogger("pumice.agent")

#: log lines per LOG message, and lines sent but not yet acknowledged per job
BATCH_LINES = 1000
BATCH_BYTES = 512 * 1024
WINDOW_LINES = 4 * BATCH_LINES
#: the longest wait for the master's acknowledgement before resending: from the heartbeat, the
#: wait doubles while the master acknowledges nothing (its disk may be full), up to this
RESEND_MAX = 60.0
#: after the job timeout, how long pumice-run may take to finish before it is stopped
OVERRUN_GRACE = 300.0


class AgentDaemon:
    """The daemon's state and loop: ``loop_once()`` handles messages, runners and log streams."""

    def __init__(self, config: AgentConfig, transport: Transport | None = None) -> None:
        self.config = config
        self.jobs_dir = config.spool / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[int, LocalJob] = {}
        self.stopping = False
        self._load_spool()
        if transport is None:
            curve = config.curve_keys()
            if curve is None:
                log.warning("connecting WITHOUT authentication (--insecure-plain): whoever answers at %s gets "
                            "this worker's logs, and a master must run --insecure-plain to accept it",
                            config.master)
            transport = Transport(config.master, config.hostname, logger=config.logger, curve=curve,
                                  heartbeat=config.heartbeat, jobs=self.unfinished)
        self.transport = transport

    # -- spool --

    def _load_spool(self) -> None:
        """Pick up the jobs of a previous run of the daemon."""
        for directory in sorted(self.jobs_dir.iterdir(), key=lambda p: p.name):
            state_file = directory / "state.json"
            if not directory.name.isdigit() or not state_file.exists():
                continue
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.error("ignoring %s: unreadable state (%s)", directory, exc)
                continue
            job = LocalJob(directory, state)
            self.jobs[job.job_id] = job
            if job.status == "running":
                log.warning("job %d was running when the daemon stopped%s", job.job_id,
                            "; its runner is still finishing" if job.alive() else "")
                # a runner that survived (no PDEATHSIG?) is stopped: the job cannot be trusted
                job.signal(signal.SIGTERM)
                job.term_at = time.monotonic()
                job.update(lost_at=time.time())

    def unfinished(self) -> list[int]:
        """Jobs the master has not acknowledged the end of."""
        return [job_id for job_id, job in self.jobs.items() if job.status != "ended"]

    def _prune(self) -> None:
        ended = sorted((j for j in self.jobs.values() if j.status == "ended"),
                       key=lambda j: j.state.get("ended_at", 0))
        for job in ended[:max(0, len(ended) - self.config.keep_jobs)]:
            job.logfile.close()
            shutil.rmtree(job.dir, ignore_errors=True)
            del self.jobs[job.job_id]

    # -- messages --

    def handle(self, msg: Message) -> None:
        if isinstance(msg, Welcome):
            for job in self.jobs.values():  # resend what the master may not have
                job.sent = job.acked
                job.end_sent_at = 0.0
                job.resends = job.end_resends = 0
        elif isinstance(msg, Start):
            self.start(msg)
        elif isinstance(msg, LogOk):
            job = self.jobs.get(msg.job_id)
            if job is not None:
                if msg.rewind:
                    log.info("job %d: the master has %d lines, resending from there", job.job_id, msg.lines)
                    job.acked = job.sent = msg.lines
                elif msg.lines > job.acked:
                    job.acked = msg.lines
                    job.sent = max(job.sent, job.acked)
                else:
                    return  # an old acknowledgement: no progress
                if job.resends >= 3:
                    log.info("job %d: the master acknowledges again (%d lines)", job.job_id, job.acked)
                job.progress_at = time.monotonic()
                job.resends = 0
        elif isinstance(msg, EndOk):
            job = self.jobs.get(msg.job_id)
            if job is not None and job.status == "exited":
                job.update(status="ended", ended_at=time.time())
                job.logfile.close()
                log.info("job %d: the master recorded its end", job.job_id)
                self._prune()
        elif isinstance(msg, Cancel):
            self.cancel(msg.job_id)
        elif isinstance(msg, Status):
            self.transport.send(StatusReply(jobs=[self.job_status(job_id) for job_id in msg.job_ids]))
        else:
            log.warning("unexpected message from the master: %s", type(msg).__name__)

    def job_status(self, job_id: int) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            return {"job_id": job_id, "state": JOB_UNKNOWN, "lines": 0}
        state = JOB_RUNNING if job.status == "running" else JOB_FINISHED
        return {"job_id": job_id, "state": state, "lines": job.logfile.count()}

    def start(self, msg: Start) -> None:
        """Run a job (a START seen before is acknowledged again, never run twice)."""
        if msg.job_id in self.jobs:
            self.transport.send(StartOk(job_id=msg.job_id))
            return
        if self.stopping:
            log.info("job %d: not started, the daemon is stopping (the master sends it again)", msg.job_id)
            return
        directory = self.jobs_dir / str(msg.job_id)
        if directory.exists():  # leftovers without a state file: a start that never happened
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        (directory / "job.yaml").write_text(msg.definition, encoding="utf-8")
        (directory / "device.yaml").write_text(msg.device, encoding="utf-8")
        own = ["--device-own", str(directory / "device-own.yaml")] if msg.device_own else []
        if own:
            (directory / "device-own.yaml").write_text(msg.device_own, encoding="utf-8")
        # JSON is YAML: pumice-run reads it with its YAML loader, the daemon needs no yaml
        (directory / "dispatcher.yaml").write_text(json.dumps(msg.dispatcher, indent=1), encoding="utf-8")
        state = {"job_id": msg.job_id, "status": "running", "device": msg.device_name, "timeout": msg.timeout,
                 "started_at": time.time()}
        job = LocalJob(directory, state)
        command = [*self.config.runner, "--device", str(directory / "device.yaml"), *own,
                   "--output-dir", str(directory), "--job-id", str(msg.job_id),
                   "--dispatcher", str(directory / "dispatcher.yaml"), str(directory / "job.yaml")]
        prepare_runner_setup()
        try:
            with open(directory / "runner.log", "ab") as runner_log:
                # its own session: a Ctrl-C meant for the daemon does not reach the job
                job.proc = subprocess.Popen(command, cwd=directory, env=job_environment(msg.env),
                                            stdin=subprocess.DEVNULL, stdout=runner_log,
                                            stderr=subprocess.STDOUT, preexec_fn=runner_setup,
                                            start_new_session=True, close_fds=True)
        except OSError as exc:
            state.update(pid=None)
            job.save()
            self.jobs[msg.job_id] = job
            job.exited(None, lost=f"cannot start pumice-run ({command[0]}): {exc.strerror or exc}")
        else:
            state.update(pid=job.proc.pid, pid_start=start_time(job.proc.pid))
            job.save()
            self.jobs[msg.job_id] = job
            log.info("job %d: started on %s (pumice-run pid %d)", msg.job_id, msg.device_name or "its device",
                     job.proc.pid)
        self.transport.send(StartOk(job_id=msg.job_id))

    def cancel(self, job_id: int) -> None:
        """SIGTERM the job's runner (pumice-run cancels and powers off), SIGKILL after the grace."""
        job = self.jobs.get(job_id)
        if job is None:
            # never started here: it ends at once, canceled, with an empty log
            directory = self.jobs_dir / str(job_id)
            directory.mkdir(parents=True, exist_ok=True)
            job = LocalJob(directory, {"job_id": job_id, "status": "exited", "health": "Canceled",
                                       "error_type": "Canceled", "cancel": True,
                                       "error_msg": "the job was canceled before it started"})
            job.save()
            self.jobs[job_id] = job
            log.info("job %d: canceled before it started", job_id)
            return
        if job.status != "running" or job.term_at is not None:
            return
        log.info("job %d: canceling (SIGTERM to pumice-run, SIGKILL in %.0f s)", job_id,
                 self.config.cancel_grace)
        job.update(cancel=True)
        job.term_at = time.monotonic()
        job.signal(signal.SIGTERM)

    # -- the loop --

    def _check_runner(self, job: LocalJob, now: float) -> None:
        if job.status != "running":
            return
        if job.alive():
            if job.term_at is not None and now - job.term_at > self.config.cancel_grace:
                log.warning("job %d: pumice-run ignored SIGTERM for %.0f s: SIGKILL", job.job_id,
                            self.config.cancel_grace)
                job.signal(signal.SIGKILL)
                job.term_at = now + 3600  # once
            timeout = float(job.state.get("timeout") or 0)
            started = float(job.state.get("started_at") or time.time())
            if timeout and job.term_at is None and time.time() - started > timeout + OVERRUN_GRACE:
                job.update(overrun=f"pumice-run overran the job timeout ({timeout:.0f} s) by more than "
                                   f"{OVERRUN_GRACE:.0f} s and was stopped")
                log.error("job %d: %s", job.job_id, job.state["overrun"])
                job.term_at = now
                job.signal(signal.SIGTERM)
            return
        if job.proc is not None:
            job.exited(job.proc.returncode)
            job.proc = None
            return
        # a runner of the previous daemon: its exit status is lost, its log is not
        result, error_type, _ = final_result(job.logfile)
        # pumice-run writes results.yaml last: if it is there, the job ended on its own, unless it
        # was canceled by the SIGTERM the daemon's death sent it
        finished = (job.dir / "results.yaml").exists()
        if finished and result == "pass":
            job.exited(0)
        elif finished and error_type == "Canceled" and job.state.get("cancel"):
            job.exited(2)
        elif finished and result == "fail" and error_type != "Canceled":
            job.exited(1)
        else:
            device = job.state.get("device") or "its device"
            job.exited(None, lost=f"pumice-agent was restarted while the job ran on {device}: the job's "
                                  f"runner (pid {job.state.get('pid')}) was stopped with it")

    def _resend_wait(self, resends: int) -> float:
        """Seconds to wait for an acknowledgement after ``resends`` unanswered resends."""
        return min(max(self.transport.heartbeat, 1.0) * 2 ** min(resends, 16), RESEND_MAX)

    def _stream(self, job: LocalJob, now: float) -> None:
        if job.status == "ended" or not self.transport.online:
            return
        if job.sent > job.acked and now - job.progress_at > self._resend_wait(job.resends):
            # the lines stay in the spool's output.yaml: only the window in flight is read again
            (log.warning if job.resends == 2 else log.debug)(
                "job %d: no acknowledgement for lines %d-%d for %.0f s: resending them%s", job.job_id,
                job.acked, job.sent, now - job.progress_at,
                " (the master may be unable to store them: resending less and less often)"
                if job.resends == 2 else "")
            job.sent = job.acked
            job.progress_at = now
            job.resends += 1
        count = job.logfile.count()
        while job.sent < count and job.sent - job.acked < WINDOW_LINES:
            lines = job.logfile.read(job.sent, min(count, job.sent + BATCH_LINES))
            size = 0
            for index, line in enumerate(lines):
                size += len(line)
                if size > BATCH_BYTES and index:
                    lines = lines[:index]
                    break
            if job.sent == job.acked:
                job.progress_at = now
            if not self.transport.send(Log(job_id=job.job_id, seq=job.sent, lines=lines)):
                return
            job.sent += len(lines)
        resend = now - job.end_sent_at > self._resend_wait(job.end_resends)
        if job.status == "exited" and job.acked >= count and resend \
                and self.transport.send(job.end_message()):
            if job.end_sent_at:
                job.end_resends += 1
            job.end_sent_at = now

    def busy(self) -> bool:
        return any(job.status != "ended" for job in self.jobs.values())

    def loop_once(self, timeout: float = 1.0) -> None:
        """Handle what arrived within ``timeout`` seconds, then runners and streams."""
        if self.busy():
            timeout = min(timeout, 0.05)  # tailing logs: a line reaches the master within ~50 ms
        for msg in self.transport.poll(timeout):
            self.handle(msg)
        now = time.monotonic()
        for job in list(self.jobs.values()):
            self._check_runner(job, now)
            self._stream(job, now)

    def run(self) -> None:
        """Loop until SIGTERM/SIGINT, then stop the running jobs and say BYE."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info("pumice-agent %s: worker %s, spool %s", __version__, self.config.hostname, self.config.spool)
        while not self.stopping:
            self.loop_once()
        self.shutdown()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.stopping = True

    def shutdown(self, grace: float | None = None) -> None:
        """Stop running jobs (they end Incomplete: the worker stopped), deliver what can be
        delivered within ``grace`` seconds, and close."""
        running = [job for job in self.jobs.values() if job.status == "running"]
        for job in running:
            job.update(overrun=f"pumice-agent was stopped on {self.config.hostname} while the job ran")
            job.term_at = time.monotonic()
            job.signal(signal.SIGTERM)
        deadline = time.monotonic() + (self.config.cancel_grace if grace is None else grace)
        while running and time.monotonic() < deadline and any(j.alive() for j in running):
            self.loop_once(0.1)
        flush = time.monotonic() + 2.0
        while self.busy() and self.transport.online and time.monotonic() < flush:
            self.loop_once(0.05)
        self.transport.close()
        for job in self.jobs.values():
            job.logfile.close()


# ---- command line ----


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pumice-agent",
        description="The Pumice agent daemon: runs jobs from the master on this box's boards. "
                    "'pumice-agent create-certificate NAME' writes a CURVE key pair.")
    p.add_argument("--master", help="the master's broker, e.g. tcp://master:5556 (env MASTER_URL)")
    p.add_argument("--logger", help="a separate endpoint for logs, e.g. tcp://master:5555 (env LOGGER_URL)")
    p.add_argument("--hostname", help="this worker's name on the master (default: the host name)")
    p.add_argument("--spool", help=f"where jobs run and logs wait for the master (default {DEFAULT_SPOOL})")
    p.add_argument("--join", metavar="TOKEN",
                   help="enrol this worker first with a join token ('pumice-master workers add/rotate NAME' "
                        "prints one): check the master's key, register this worker's (env PUMICE_JOIN_TOKEN)")
    p.add_argument("--url", help="the master's REST API for --join, e.g. http://master:8000 (env PUMICE_URL)")
    p.add_argument("--master-cert", help="the master's public key file (default SPOOL/keys/master.key)")
    p.add_argument("--worker-cert", help="this worker's key pair (default SPOOL/keys/NAME.key_secret)")
    p.add_argument("--insecure-plain", action="store_true", default=None,
                   help="connect WITHOUT authentication (no CURVE), to a master that runs --insecure-plain: "
                        "for a closed test network only")
    # CURVE is the default now: the old switch is accepted and changes nothing
    p.add_argument("--encrypt", action="store_true", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cancel-grace", type=float,
                   help="seconds from SIGTERM to SIGKILL on cancel (default 60)")
    p.add_argument("--keep-jobs", type=int, help="finished job directories kept in the spool (default 20)")
    p.add_argument("--heartbeat", type=float, help=argparse.SUPPRESS)
    p.add_argument("--config", help=f"config file (default {DEFAULT_CONFIG} when it exists)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"pumice-agent {__version__}")
    return p


def certificate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pumice-agent create-certificate",
                                description="Write NAME.key (public: give it to the master) and "
                                            "NAME.key_secret (keep it on this worker) for CURVE encryption.")
    p.add_argument("name", help="the key pair's name (the worker's hostname, or 'master')")
    p.add_argument("--directory", default=".", help="where to write the files (default: here)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["create-certificate"]:
        options = certificate_parser().parse_args(argv[1:])
        try:
            public, secret = create_certificate(options.name, options.directory)
        except CertificateError as exc:
            print(f"pumice-agent: {exc}", file=sys.stderr)
            return 1
        print(f"public key: {public}\nsecret key: {secret} (keep it on this machine)")
        return 0
    options = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(options)
    if config.join:
        try:
            join(config.join, config.url or "", config.hostname, config.key_files(),
                 worker_cert=Path(config.worker_cert) if config.worker_cert else None)
        except JoinError as exc:
            print(f"pumice-agent: enrolment failed: {exc}", file=sys.stderr)
            return 1
    try:
        daemon = AgentDaemon(config)
    except CertificateError as exc:
        print(f"pumice-agent: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pumice-agent: cannot use the spool {config.spool}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
