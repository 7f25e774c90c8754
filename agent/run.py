"""``pumice-run``: run one job on one device, standalone, like ``lava-run``.

Writes ``output.yaml`` (the log), ``results.yaml`` (the bundle) and ``description.yaml`` (the pipeline
with its levels) into the output directory. Exit status: 0 Complete, 1 Incomplete, 2 Canceled.
SIGTERM (or SIGINT) cancels: the current action stops, finalize powers the board off.
"""

from __future__ import annotations

import functools
import gc
import importlib
import os
import signal
import sys
from typing import TYPE_CHECKING

from agent import __version__
from agent.errors import EXIT_STATUS, Canceled, JobDefinitionError

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

# Everything else (argparse, PyYAML, the job and its actions) is imported once main() has turned
# the collector off: importing is most of what pumice-run does before a board boots (see settle_heap).


def parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="pumice-run", description="Run one LAVA-format job on one device.")
    p.add_argument("job", type=Path, help="the job definition (YAML)")
    p.add_argument("--device", type=Path, required=True, help="the device configuration (rendered YAML)")
    p.add_argument("--device-own", type=Path,
                   help="the device configuration rendered without the job's context: what of --device is the "
                        "lab's own (default: all of it)")
    p.add_argument("--output-dir", type=Path, help="where output.yaml, results.yaml and description.yaml go")
    p.add_argument("--job-id", default="0", help="the job id (default 0)")
    p.add_argument("--validate", action="store_true", help="only validate the job against the device")
    p.add_argument("--dispatcher", type=Path, help="the worker's configuration (YAML: dispatcher_ip, ...)")
    p.add_argument("--env-dut", type=Path, help="environment for the board's test shell (YAML mapping)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the log to stdout")
    p.add_argument("--version", action="version", version=f"pumice-run {__version__}")
    return p


def read_yaml(path: Path, what: str) -> dict:
    # libyaml when present (a device configuration is large, the pure-Python parser takes tens of
    # ms), within the limits of what users send (a job's context is rendered into the device's)
    from results.bounded import load_mapping_file

    try:
        return load_mapping_file(path, what)
    except ValueError as exc:
        raise SystemExit(f"pumice-run: {exc}") from None


class Canceller:
    """SIGTERM/SIGINT cancel the job once; during finalize they are noted and ignored."""

    def __init__(self) -> None:
        self.job = None

    def __call__(self, signum: int, frame) -> None:
        job = self.job
        if job is None:
            raise Canceled("The job was canceled before it started")
        first = not job.canceled
        job.canceled = True
        if first and not job.cleaning:
            job.logger.warning(f"received signal {signal.Signals(signum).name}: canceling the job")
            raise Canceled("The job was canceled")
        job.logger.warning(f"received signal {signal.Signals(signum).name} again: finishing the cleanup")


def settle_heap() -> None:
    """Hand everything allocated so far to the permanent generation (``gc.freeze``) and turn the
    collector back on. Start-up builds many objects that live as long as the process (modules,
    schemas, the pipeline) and no garbage cycles worth collecting: leaving them to the collector
    costs milliseconds while importing and again when the interpreter exits."""
    gc.freeze()
    gc.enable()


def main(argv: list[str] | None = None) -> int:
    gc.disable()  # until the job is loaded: see settle_heap
    options = parser().parse_args(argv)
    canceller = Canceller()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, canceller)

    from agent.job import load_job  # after the signal handlers: a cancel is never lost
    from agent.logger import JobLogger

    text = options.job.read_bytes().decode("utf-8", errors="replace") if options.job.exists() else None
    if text is None:
        print(f"pumice-run: no such job file: {options.job}", file=sys.stderr)
        return EXIT_STATUS["Incomplete"]
    device = read_yaml(options.device, "device configuration")
    device_own = read_yaml(options.device_own, "device's own configuration") if options.device_own else None
    dispatcher = read_yaml(options.dispatcher, "dispatcher configuration") if options.dispatcher else {}
    env_dut = read_yaml(options.env_dut, "board environment") if options.env_dut else {}

    output = options.output_dir
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    logger = JobLogger(output / "output.yaml" if output else None,
                       echo=sys.stdout if options.verbose or output is None else None)
    logger.info(f"pumice-run, installed at version: {__version__}")
    logger.info("start: 0 validate")

    try:
        job = load_job(text, device, job_id=options.job_id, logger=logger, output_dir=output,
                       env=dict(os.environ), dispatcher=dispatcher, device_own=device_own)
    except JobDefinitionError as exc:
        settle_heap()
        for fault in exc.faults:
            logger.error(str(fault))
            print(f"pumice-run: {fault}", file=sys.stderr)
        logger.results({"definition": "lava", "case": "validate", "result": "fail"})
        logger.results({"definition": "lava", "case": "job", "result": "fail",
                        "error_type": exc.error_type, "error_msg": str(exc)})
        _write_description(output, {"pipeline": []})
        return EXIT_STATUS["Incomplete"]
    settle_heap()
    canceller.job = job
    if env_dut:
        job.definition.setdefault("environment", {}).update(env_dut)
    logger.results({"definition": "lava", "case": "validate", "result": "pass"})
    if options.validate:
        _write_description(output, job.describe())
        print("pumice-run: the job is valid for this device", file=sys.stderr)
        return 0

    # description.yaml and the bundle writer's import wait for the board to boot (Job.defer)
    job.defer(lambda: _write_description(output, job.describe()))
    job.defer(functools.partial(importlib.import_module, "results.bundle"))
    health = job.run()
    job.while_booting()  # the deferred work of a job that never booted a board
    if output is not None:
        from results.bundle import write_bundle

        write_bundle(output / "results.yaml", options.job_id, job.results)
    logger.close()
    gc.freeze()  # the job is over: the interpreter's exit need not walk its objects
    print(f"pumice-run: job {options.job_id} {health}"
          + (f": {job.error.error_type} error: {job.error}" if job.error else ""), file=sys.stderr)
    return EXIT_STATUS[health]


def _write_description(output: Path | None, description: dict) -> None:
    """description.yaml next to the log: the pipeline of a valid job with its levels
    (``job.describe()``), or an empty pipeline for an invalid one."""
    if output is not None:
        import yaml

        from results.fastyaml import SafeDumper

        (output / "description.yaml").write_text(
            yaml.dump(description, Dumper=SafeDumper, sort_keys=False, width=120), encoding="utf-8")


def cli() -> None:
    """The ``pumice-run`` command: main(), then a quick exit. By then the job's files are written
    and closed, and the interpreter's teardown (freeing every module and object: milliseconds) is
    of no use: the process ends with os._exit once standard output and error are flushed. An
    error that ends main() early (SystemExit, a bug) takes the usual way out."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    cli()
