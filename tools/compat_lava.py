#!/usr/bin/env python3
"""LAVA's side of the validation suite: device configurations and golden verdicts.

``devices``: pairs every collected job with a device dictionary and renders its device
configuration with LAVA 2023.01's own device-type templates (the shared corpus's
``device-types/``), in an environment set as lava-server's: a sandboxed Jinja2 environment over
the device dictionaries then the device-type templates, ``autoescape`` off, ``trim_blocks`` on,
and the job's ``context:`` passed as the render's variables (a dictionary's own ``{% set %}``
wins). Writes ``devices/*.yaml`` and ``index.yaml``.

``goldens``: runs ``lava-run --validate`` (Debian's lava-dispatcher 2023.01) on every job with its
device and records the verdict, the errors and the pipeline (``lava/<id>.yaml``). lava-run checks
every URL: it runs in a network namespace of its own (``unshare -n``) where only loopback is up,
and LAVA's dispatcher setting ``http_url_format_string`` sends each http(s) URL to a server on
127.0.0.1 in that namespace that answers any path with a small file. Nothing leaves the machine.

``make compat`` runs both after compat_collect.py (it takes minutes: lava-run spends a second or
more on a job). ``make test`` reads what they wrote and never runs lava-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compat import DATA, INDEX, LAVA_VERSION, Case, corpus_dir, load_cases, skeleton  # noqa: E402

DICTIONARIES = DATA / "dictionaries"
DEVICES = DATA / "devices"
CORPUS_JOB_DIRS = ("sample-jobs", "scheduler-sample-jobs")
#: The corpus dictionary used for a device type that several corpus dictionaries extend.
PREFERRED = {"qemu": "qemu01", "beaglebone-black": "bbb-01", "x15": "x15-01", "x15-bl": "x15-bl-01"}
#: Device type names of LAVA's test jobs that are aliases (lava-server resolves aliases).
ALIASES = {"bbb": "beaglebone-black"}
#: lava-run's own limit per job (a job that hangs its validation is recorded as such).
LAVA_TIMEOUT = 120


def log(message: str) -> None:
    print(f"compat-lava: {message}", file=sys.stderr)


# --- device configurations ---------------------------------------------------------------------------

def job_device_type(job: dict) -> str | None:
    """The device type a job asks for (a MultiNode job's first role's)."""
    if job.get("device_type"):
        return str(job["device_type"])
    roles = ((job.get("protocols") or {}).get("lava-multinode") or {}).get("roles") or {}
    for role in roles.values():
        if isinstance(role, dict) and role.get("device_type"):
            return str(role["device_type"])
    return None


def minimal_dictionary(device_type: str) -> str:
    """A device dictionary for a device type the corpus has no device of: what a lab sets on
    every board (its console and power commands), nothing else."""
    return (f"{{% extends '{device_type}.jinja2' %}}\n"
            "{% set connection_command = 'telnet localhost 7000' %}\n"
            "{% set power_on_command = '/usr/local/bin/pdu --port 1 on' %}\n"
            "{% set power_off_command = '/usr/local/bin/pdu --port 1 off' %}\n"
            "{% set hard_reset_command = '/usr/local/bin/pdu --port 1 reboot' %}\n")


def choose_dictionary(device_type: str | None, corpus: Path) -> str:
    """The name of the dictionary a job's device is rendered from (created if it is missing)."""
    device_type = ALIASES.get(device_type or "qemu", device_type or "qemu")
    if device_type in PREFERRED:
        return PREFERRED[device_type]
    if not (corpus / "device-types" / f"{device_type}.jinja2").exists():
        if device_type.startswith("qemu"):  # a lab's alias of the qemu type (qemu-arm64, qemu_foo...)
            return PREFERRED["qemu"]
        raise LookupError(f"no device-type template {device_type}.jinja2 in the corpus")
    for path in sorted((corpus / "devices").glob("*.jinja2")):
        text = path.read_text()
        if f"extends '{device_type}.jinja2'" in text or f'extends "{device_type}.jinja2"' in text:
            return path.stem
    # named as a device, not as its type: a dictionary is found on the same search path as the
    # templates, and one named like its type would extend itself
    path = DICTIONARIES / f"{device_type}-01.jinja2"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(minimal_dictionary(device_type))
    return path.stem


def lava_server_environment(corpus: Path):
    """Jinja2 set as lava-server 2023.01 renders a device's configuration (see the docstring)."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    loader = jinja2.FileSystemLoader([str(DICTIONARIES), str(corpus / "devices"), str(corpus / "device-types")])
    return SandboxedEnvironment(loader=loader, autoescape=False, trim_blocks=True, cache_size=-1)


def collected_jobs(corpus: Path) -> list[tuple[str, str, str, Path]]:
    """(id, source, index path, file) of every collected job."""
    jobs = []
    for directory in CORPUS_JOB_DIRS:
        for path in sorted((corpus / directory).glob("*.yaml")):
            jobs.append((f"corpus/{directory}/{path.stem}", "corpus", f"corpus:{directory}/{path.name}", path))
    for path in sorted((DATA / "jobs").rglob("*.yaml")):
        rel = path.relative_to(DATA / "jobs")
        jobs.append((str(rel.with_suffix("")), rel.parts[0], str(path.relative_to(DATA)), path))
    return jobs


def render_devices(corpus: Path) -> list[Case]:
    env = lava_server_environment(corpus)
    shutil.rmtree(DEVICES, ignore_errors=True)
    DEVICES.mkdir(parents=True)
    cases = []
    for job_id, source, job_ref, path in collected_jobs(corpus):
        job = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(job, dict):
            log(f"{job_id}: not a YAML mapping, left out")
            continue
        try:
            dictionary = choose_dictionary(job_device_type(job), corpus)
        except LookupError as exc:
            log(f"{job_id}: left out: {exc}")
            continue
        context = job.get("context") if isinstance(job.get("context"), dict) else {}
        suffix = ""
        if context:
            suffix = "-" + hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:8]
        device = DEVICES / f"{dictionary}{suffix}.yaml"
        if not device.exists():
            text = env.get_template(f"{dictionary}.jinja2").render(**context)
            yaml.safe_load(text)  # a template that renders broken YAML is a collection error
            device.write_text(text, encoding="utf-8")
        cases.append(Case(job_id, source, job_ref, dictionary, str(device.relative_to(DATA))))
    INDEX.write_text(
        "# The collected jobs of the side-by-side validation suite (written by tools/compat_lava.py)\n"
        + yaml.safe_dump([case.__dict__ for case in cases], sort_keys=False, width=200), encoding="utf-8")
    log(f"{len(cases)} jobs, {len(list(DEVICES.glob('*.yaml')))} device configurations")
    return cases


# --- LAVA's verdicts ----------------------------------------------------------------------------------

class AnyFile(BaseHTTPRequestHandler):
    """Answers every path with the same small file: LAVA's validation only asks for sizes."""

    body = b"\0" * 1024

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self.do_HEAD()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


def lava_verdict(case: Case, corpus: Path | None, dispatcher: Path, work: Path, job_id: int) -> dict:
    """Run lava-run --validate on one case; its verdict, errors and pipeline."""
    out = work / f"out-{job_id}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["lava-run", "--validate", "--job-id", str(job_id), "--output-dir", str(out),
           "--device", str(case.device_path), "--dispatcher", str(dispatcher), str(case.job_path(corpus))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAVA_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"verdict": "invalid", "errors": [f"lava-run --validate did not finish in {LAVA_TIMEOUT} s"]}
    errors, validate = [], None
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        msg = record.get("msg")
        if record.get("lvl") == "results" and isinstance(msg, dict) and msg.get("definition") == "lava":
            if msg.get("case") == "validate":
                validate = msg.get("result")
            elif msg.get("case") == "job" and msg.get("result") == "fail":
                errors.append(f"{msg.get('error_type')}: {str(msg.get('error_msg') or '').strip()}")
    valid = done.returncode == 0 and validate == "pass"
    if not valid and not errors:
        errors.append(f"lava-run exited {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
    result = {"verdict": "valid" if valid else "invalid", "errors": errors}
    description = out / "description.yaml"
    if valid and description.exists():
        data = yaml.load(description.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader) or {}
        result["pipeline"] = skeleton(data.get("pipeline") or [])
    shutil.rmtree(out, ignore_errors=True)
    return result


def write_golden(case: Case, result: dict) -> None:
    path = case.golden_path
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# lava-run --validate ({LAVA_VERSION}) on {case.job} with {case.device}\n"
    path.write_text(header + yaml.safe_dump({"job": case.id, **result}, sort_keys=False, width=200),
                    encoding="utf-8")


def private_worker_setup(base: Path) -> None:
    """What lava-run checks on a worker for TFTP deploys, in this mount namespace only: tftpd-hpa's
    configuration (/etc/default here is a copy holding one; the machine's own is not touched) and
    its program on $PATH (only that it is there: nothing is served)."""
    copy, root, bin_dir = base / "etc-default", base / "tftp", base / "bin"
    for directory in (copy, root, bin_dir):
        directory.mkdir()
    for item in Path("/etc/default").iterdir():
        if item.is_file():
            shutil.copy2(item, copy / item.name)
    (copy / "tftpd-hpa").write_text(f'TFTP_USERNAME="tftp"\nTFTP_DIRECTORY="{root}"\nTFTP_ADDRESS=":69"\n')
    subprocess.run(["mount", "--bind", str(copy), "/etc/default"], check=True)
    (bin_dir / "in.tftpd").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "in.tftpd").chmod(0o755)
    os.environ["PATH"] = f"{os.environ['PATH']}:{bin_dir}"


def goldens_inside(jobs: int, only: list[str]) -> int:
    """In the private network namespace: loopback up, the any-file server, then lava-run on every case."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), AnyFile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    corpus = corpus_dir()
    cases = [c for c in load_cases() if not only or any(c.id.startswith(prefix) for prefix in only)]
    with tempfile.TemporaryDirectory(prefix="compat-lava-") as tmp:
        work = Path(tmp)
        private_worker_setup(work)
        dispatcher = work / "dispatcher.yaml"
        dispatcher.write_text(yaml.safe_dump({
            "dispatcher_ip": "127.0.0.1",
            "http_url_format_string": f"http://127.0.0.1:{server.server_address[1]}/%s",
        }))

        def one(item: tuple[int, Case]) -> str:
            index, case = item
            if case.job_path(corpus) is None:
                return f"{case.id}: skipped (no corpus)"
            result = lava_verdict(case, corpus, dispatcher, work, index + 1)
            write_golden(case, result)
            return f"{case.id}: {result['verdict']}"

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for count, line in enumerate(pool.map(one, enumerate(cases)), 1):
                log(f"[{count}/{len(cases)}] {line}")
    server.shutdown()
    return 0


def goldens(jobs: int, only: list[str]) -> int:
    """Re-run this script in network and mount namespaces of its own (root: unshare)."""
    if not shutil.which("lava-run"):
        log("lava-run is not installed (Debian's lava-dispatcher)")
        return 1
    if not only:
        shutil.rmtree(DATA / "lava", ignore_errors=True)
    cmd = ["unshare", "--net", "--mount", sys.executable, __file__, "goldens", "--inside", "--jobs", str(jobs), *only]
    return subprocess.run(cmd, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["devices", "goldens", "all"])
    parser.add_argument("only", nargs="*", help="goldens: only the jobs whose id starts with one of these")
    parser.add_argument("--jobs", type=int, default=2, help="lava-run processes at once")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_intermixed_args(argv)
    if options.inside:
        return goldens_inside(options.jobs, options.only)
    corpus = corpus_dir()
    if corpus is None:
        log("the LAVA corpus (../shared/lava-corpus or $PUMICE_LAVA_CORPUS) is needed")
        return 1
    if options.step in ("devices", "all"):
        render_devices(corpus)
    if options.step in ("goldens", "all"):
        return goldens(options.jobs, options.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
