"""``make demo``: a whole lab on this machine, end to end, then where to look.

A master on SQLite, a local agent (enrolled with a join token, then authenticated with CURVE, as
every agent is by default), an emulated board (QEMU x86_64 with the Debian kernel and a busybox
initramfs), a sample LAVA-format job submitted over the REST API, and the static site the master
publishes when the job ends. Everything lives under ``demo/`` in the checkout; ``--keep-running``
leaves the master and the agent up until Ctrl-C. The master listens on loopback only, on free
ports picked at start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def master(data: Path, *args: str) -> str:
    done = subprocess.run([str(BIN / "pumice-master"), "--data", str(data), *args],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pumice-master {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout.strip()


def api(url: str, token: str, path: str, body: bytes | None = None, text: bool = False):
    request = urllib.request.Request(f"{url}/api/v0.2/{path}", data=body,
                                     headers={"Authorization": f"Token {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return payload.decode() if text else json.loads(payload)


def wait_until(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-running", action="store_true", help="leave the master and agent up")
    options = parser.parse_args()

    demo = ROOT / "demo"
    shutil.rmtree(demo, ignore_errors=True)
    data, spool, www = demo / "master", demo / "agent", demo / "www"
    for folder in (data, spool, www):
        folder.mkdir(parents=True)

    step("images: the board's kernel and initramfs, built from Debian packages")
    cache = Path(os.environ.get("PUMICE_CACHE", Path.home() / ".cache" / "pumice"))
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_dut_images.py"), "--cache", str(cache),
                    "--arch", "amd64"], check=True)
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        shutil.copyfile(cache / "dut" / "amd64" / name, www / name)
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(www)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    files_url = f"http://127.0.0.1:{files.server_address[1]}"
    print(f"    served at {files_url} (a stand-in for your artifact server)")

    step("lab: a worker, the qemu device type, one board and an admin token")
    master(data, "db", "migrate")
    added = master(data, "workers", "add", "demo-worker", "--description", "this machine")
    join_token = next(line.split()[-1] for line in added.splitlines() if line.startswith("join token: "))
    master(data, "device-types", "add", "qemu")
    master(data, "devices", "add", "qemu-01", "--type", "qemu", "--worker", "demo-worker",
           "--dictionary", str(DATA / "qemu-amd64.jinja2"))
    token = master(data, "tokens", "create", "--user", "demo", "--admin").split()[-1]

    http_port, broker_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    logs = demo / "logs"
    logs.mkdir()
    step(f"master: REST API on {url}, broker on tcp://127.0.0.1:{broker_port}")
    processes = [subprocess.Popen(
        [str(BIN / "pumice-master"), "--data", str(data), "serve", "--http", f"127.0.0.1:{http_port}",
         "--broker", f"tcp://127.0.0.1:{broker_port}", "--url", f"file://{data / 'site'}"],
        stdout=(logs / "master.log").open("w"), stderr=subprocess.STDOUT)]  # noqa: SIM115
    try:
        wait_until("the master", lambda: api(url, token, "system/version/"), 30)
        step("agent: pumice-agent enrols with its join token (checks the master's key, registers its own) "
             "and connects out to the master with CURVE")
        print(f"    pumice-agent --join {join_token[:12]}... --url {url} --master tcp://127.0.0.1:{broker_port} "
              "--hostname demo-worker")
        processes.append(subprocess.Popen(
            [str(BIN / "pumice-agent"), "--master", f"tcp://127.0.0.1:{broker_port}",
             "--hostname", "demo-worker", "--spool", str(spool), "--join", join_token, "--url", url],
            stdout=(logs / "agent.log").open("w"), stderr=subprocess.STDOUT))  # noqa: SIM115
        wait_until("the worker to come online",
                   lambda: api(url, token, "workers/demo-worker/")["state"].lower() == "online", 30)
        step("the worker's file policy: jobs may download from the files server on this machine")
        # a worker refuses jobs that read its own files or services unless its dispatcher
        # configuration allows them: here, exactly the files server's address
        policy = f"allowed_local_addresses: ['127.0.0.1:{files.server_address[1]}']\n"
        print(f"    curl -X PUT -H 'Authorization: Token {token}' --data-binary \"{policy.strip()}\" "
              f"{url}/api/v0.2/workers/demo-worker/config/")
        api(url, token, "workers/demo-worker/config/", policy.encode())

        step("job: a LAVA-format job submitted over the REST API (what curl does)")
        job = (DATA / "smoke-job.yaml").read_text()
        job = job.replace("@KERNEL_URL@", f"{files_url}/vmlinuz")
        job = job.replace("@RAMDISK_URL@", f"{files_url}/initramfs.cpio.gz")
        job = job.replace("@KERNEL_SHA256@", hashlib.sha256((www / "vmlinuz").read_bytes()).hexdigest())
        (demo / "job.yaml").write_text(job)
        print(f"    curl -H 'Authorization: Token {token}' --data-binary @demo/job.yaml {url}/api/v0.2/jobs/")
        submitted = api(url, token, "jobs/", job.encode())
        job_id = submitted["job_ids"][0]
        print(f"    job {job_id} submitted")
        last = None

        def finished() -> bool:
            nonlocal last
            state = api(url, token, f"jobs/{job_id}/")
            if state["state"] != last:
                last = state["state"]
                print(f"    job {job_id}: {last}", flush=True)
            return state["state"] == "Finished"

        wait_until(f"job {job_id} to finish", finished, 300)
        shown = api(url, token, f"jobs/{job_id}/")
        step(f"job {job_id} is {shown['health']} on {shown['device']}: its test results")
        for line in api(url, token, f"jobs/{job_id}/csv/", text=True).splitlines():
            if ",lava," not in line:  # the test cases, not the per-action results
                print(f"    {line}")
        site = data / "site"
        step("where to look")
        print(f"    the static site:   {site / 'index.html'}")
        print(f"    this job's page:   {site / 'jobs' / str(job_id) / 'index.html'}")
        print(f"    its log and files: {site / 'jobs' / str(job_id)}/ (output.yaml, results.yaml, junit.xml...)")
        print(f"    serve it:          nginx with deploy/nginx/pumice-site.conf (root {site})")
        print(f"    the REST API:      {url}/api/v0.2/jobs/{job_id}/  (with --keep-running; token {token})")
        print(f"    logs of the demo:  {logs}/")
        if options.keep_running:
            print("\nthe master and the agent keep running; Ctrl-C stops them")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0 if shown["health"] == "Complete" else 1
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        files.shutdown()


if __name__ == "__main__":
    sys.exit(main())
