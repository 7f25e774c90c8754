"""``pumice``: the user's command-line client for a Pumice master's REST API.

    pumice --url http://master:8000 --token T submit --wait job.yaml
    pumice show 12 | cancel 12 | logs 12 [--follow] | results 12 [--format junit]
    pumice bundle download 12 -o job12.yaml; pumice --url http://other:8000 bundle upload job12.yaml

The URL and token come from the options, else ``PUMICE_URL`` / ``PUMICE_TOKEN``, else
``~/.config/pumice.yaml`` (``url: ...`` and ``token: ...``; ``PUMICE_CONFIG`` names another file).
Deps: stdlib, pyyaml and results/ only, so it installs with the agent.

Exit status: 0 done (a waited job Complete), 1 a waited job Incomplete, 2 Canceled, 3 a refused
request (the error and each fault are printed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit

import yaml

from agent.errors import EXIT_STATUS
from results.log import LogRecord

API = "/api/v0.2"
EXIT_REFUSED = 3


class ApiError(Exception):
    """The master refused a request: its HTTP status, message and faults."""

    def __init__(self, status: int, message: str, faults: list[dict] | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.faults = faults or []

    def describe(self) -> str:
        lines = [f"error ({self.status}): {self.message}"]
        for fault in self.faults:
            where = fault.get("path") or "job"
            if fault.get("line") is not None:
                where += f" (line {fault['line']})"
            lines.append(f"  {where}: {fault.get('message')}")
        return "\n".join(lines)


class Client:
    """A small REST client (one persistent HTTP connection; use one Client per thread)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"bad master URL {url!r}: expected http://host:port")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._https = parts.scheme == "https"
        self._netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._netloc, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, *, body: bytes | str | None = None, json_body: Any = None,
                params: dict[str, Any] | None = None, content_type: str | None = None,
                token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """Send one request; returns (status, headers, body) whatever the status."""
        headers = {"Accept": "application/json"}
        auth = token if token is not None else self.token
        if auth:
            headers["Authorization"] = f"Token {auth}"
        if json_body is not None:
            body = json.dumps(json_body)
            content_type = "application/json"
        if isinstance(body, str):
            body = body.encode("utf-8")
        if body is not None:
            headers["Content-Type"] = content_type or "application/yaml"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        target = self.prefix + API + path + ("?" + urlencode(query) if query else "")
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, target, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                return reply.status, {k.lower(): v for k, v in reply.getheaders()}, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # a kept-alive connection the server closed: retry once on a new one
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request whose success is 2xx: decoded JSON (or text); an ApiError otherwise."""
        status, headers, data = self.request(method, path, **kwargs)
        text = data.decode("utf-8", errors="replace")
        is_json = headers.get("content-type", "").startswith("application/json")
        if status >= 400:
            if is_json:
                try:
                    err = json.loads(text)
                    raise ApiError(status, err.get("error", text), err.get("faults"))
                except (ValueError, AttributeError):
                    pass
            raise ApiError(status, text.strip() or f"HTTP {status}")
        return json.loads(text) if is_json else text

    # ---- the calls the CLI makes ----

    def submit(self, definition: str) -> list[int]:
        return self.call("POST", "/jobs/", json_body={"definition": definition})["job_ids"]

    def validate(self, definition: str) -> dict:
        return self.call("POST", "/jobs/validate/", json_body={"definition": definition})

    def job(self, job_id: int | str) -> dict:
        return self.call("GET", f"/jobs/{job_id}/")

    def cancel(self, job_id: int | str) -> dict:
        return self.call("POST", f"/jobs/{job_id}/cancel/")

    def logs(self, job_id: int | str, start: int = 0, end: int | None = None) -> str:
        return self.call("GET", f"/jobs/{job_id}/logs/", params={"start": start, "end": end})

    def results(self, job_id: int | str, fmt: str = "yaml") -> str:
        return self.call("GET", f"/jobs/{job_id}/results/", params={"format": fmt})

    def upload_bundle(self, text: str) -> dict:
        """Import a results bundle as a job of this master: ``{job, created, url, source}``."""
        return self.call("POST", "/bundles/", body=text, content_type="application/yaml")


# ---- configuration ----

def load_config(path: str | None = None) -> dict[str, Any]:
    """``~/.config/pumice.yaml`` (or ``PUMICE_CONFIG``): ``url`` and ``token``."""
    path = path or os.environ.get("PUMICE_CONFIG") or str(Path.home() / ".config" / "pumice.yaml")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"pumice: {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"pumice: {path} must be a mapping with url: and token:")
    return data


# ---- output ----

def format_record(record: LogRecord) -> str:
    """One log record for a terminal: console output as is, dispatcher messages with their level."""
    msg = record.msg if isinstance(record.msg, str) else json.dumps(record.msg)
    if record.lvl == "target":
        return msg
    if record.lvl == "results":
        return f"[results] {msg}"
    return f"{record.dt[11:19]} {record.lvl:<8} {msg}"


class LogStreamer:
    """Prints a job's new log lines and keeps a status line at the bottom of a terminal."""

    def __init__(self, client: Client, job_id: int, out: TextIO | None = None) -> None:
        self.client = client
        self.job_id = job_id
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.offset = 0
        self._status = ""

    def _write(self, text: str) -> None:
        if self.tty and self._status:
            self.out.write("\r\033[K")
        self.out.write(text)
        if self.tty and self._status:
            self.out.write(self._status)
        self.out.flush()

    def fetch(self) -> int:
        """Print the lines written since the last call; returns how many."""
        text = self.client.logs(self.job_id, start=self.offset)
        lines = text.splitlines()
        out = []
        for line in lines:
            try:
                out.append(format_record(LogRecord.from_line(line)) + "\n")
            except ValueError:  # not a record: show it as it is
                out.append(line + "\n")
        if out:
            self._write("".join(out))
        self.offset += len(lines)
        return len(lines)

    def status(self, job: dict) -> None:
        where = f" on {job['device']}" if job.get("device") else ""
        text = f"job {job['id']}: {job['state']}{where}"
        if job["state"] == "Finished":
            text += f", {job['health']}"
        if self.tty:
            self._status = f"\033[7m {text} \033[0m"
            self.out.write("\r\033[K" + self._status)
            self.out.flush()
        elif text != self._status:
            self._status = text
            self.out.write(f"== {text}\n")
            self.out.flush()

    def done(self) -> None:
        if self.tty and self._status:
            self.out.write("\n")
            self.out.flush()


def wait_for(client: Client, job_id: int, *, poll: float = 1.0, stream: bool = True,
             out: TextIO | None = None, timeout: float | None = None) -> dict:
    """Follow a job until it is Finished, streaming its log; returns the final job record."""
    streamer = LogStreamer(client, job_id, out)
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        job = client.job(job_id)
        if stream:
            streamer.fetch()
        streamer.status(job)
        if job["state"] == "Finished":
            if stream:
                streamer.fetch()  # the last lines may land just before the end
            streamer.done()
            return job
        if deadline and time.monotonic() > deadline:
            streamer.done()
            raise TimeoutError(f"job {job_id} not finished after {timeout} s")
        time.sleep(poll)


# ---- commands ----

def _cmd_submit(client: Client, args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        definition = Path(path).read_text(encoding="utf-8") if path != "-" else sys.stdin.read()
        ids = client.submit(definition)
        for job_id in ids:
            print(job_id if not args.wait else f"job {job_id} submitted: {client.url}{API}/jobs/{job_id}/")
        if args.wait:
            for job_id in ids:
                job = wait_for(client, job_id, poll=args.poll, stream=not args.no_logs, timeout=args.timeout)
                status = max(status, EXIT_STATUS.get(job["health"], 1))
    return status


def _cmd_validate(client: Client, args: argparse.Namespace) -> int:
    result = client.validate(Path(args.file).read_text(encoding="utf-8"))
    if result["valid"]:
        print(f"{args.file}: valid")
        return 0
    for fault in result["faults"]:
        where = fault.get("path") or "job"
        if fault.get("line") is not None:
            where += f" (line {fault['line']})"
        print(f"{args.file}: {where}: {fault['message']}")
    return EXIT_REFUSED


def _cmd_show(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.job_id)
    if args.yaml:
        print(yaml.safe_dump(job, sort_keys=False), end="")
        return 0
    width = max(len(k) for k in job)
    for key, value in job.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"{key:<{width}} : {'' if value is None else value}")
    return 0


def _cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    print(f"job {job['id']}: {job['state']}" + (f", {job['health']}" if job["state"] == "Finished" else ""))
    return 0


def _cmd_logs(client: Client, args: argparse.Namespace) -> int:
    if args.follow:
        job = wait_for(client, args.job_id, poll=args.poll, timeout=args.timeout)
        return EXIT_STATUS.get(job["health"], 1)
    text = client.logs(args.job_id, start=args.start, end=args.end)
    if args.raw:
        sys.stdout.write(text)
        return 0
    for line in text.splitlines():
        try:
            sys.stdout.write(format_record(LogRecord.from_line(line)) + "\n")
        except ValueError:
            sys.stdout.write(line + "\n")
    return 0


def _cmd_results(client: Client, args: argparse.Namespace) -> int:
    sys.stdout.write(client.results(args.job_id, args.format))
    return 0


def _cmd_bundle_download(client: Client, args: argparse.Namespace) -> int:
    text = client.results(args.job_id, "yaml")
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"job {args.job_id}: bundle written to {args.output}")
    return 0


def _cmd_bundle_upload(client: Client, args: argparse.Namespace) -> int:
    text = Path(args.file).read_text(encoding="utf-8") if args.file != "-" else sys.stdin.read()
    reply = client.upload_bundle(text)
    origin = (reply.get("source") or {}).get("url") or "another instance"
    where = f": {reply['url']}" if reply.get("url") else ""
    if reply["created"]:
        print(f"job {reply['job']} imported from {origin}{where}")
    else:
        print(f"job {reply['job']}: this bundle from {origin} was imported before{where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pumice", description="Submit and follow jobs on a Pumice master.")
    parser.add_argument("--url", help="the master (default: $PUMICE_URL or url: in ~/.config/pumice.yaml)")
    parser.add_argument("--token", help="API token (default: $PUMICE_TOKEN or token: in the config file)")
    parser.add_argument("--config", help="config file (default: $PUMICE_CONFIG or ~/.config/pumice.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit job definitions (prints the job ids)")
    p.add_argument("files", nargs="+", metavar="JOB.yaml", help="job definition files ('-': stdin)")
    p.add_argument("--wait", action="store_true", help="follow each job to its end, streaming its log")
    p.add_argument("--no-logs", action="store_true", help="with --wait: only show the status")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls with --wait")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("validate", help="check a job definition without submitting it")
    p.add_argument("file", metavar="JOB.yaml")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("show", help="a job's state, health, device, times")
    p.add_argument("job_id")
    p.add_argument("--yaml", action="store_true", help="print the record as YAML")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("logs", help="a job's log")
    p.add_argument("job_id")
    p.add_argument("--start", type=int, default=0, help="first line (0-based)")
    p.add_argument("--end", type=int, help="line after the last one")
    p.add_argument("--raw", action="store_true", help="the output.yaml lines as stored")
    p.add_argument("--follow", action="store_true", help="stream until the job ends")
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--timeout", type=float, help="with --follow: give up after this many seconds")
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("results", help="a job's results")
    p.add_argument("job_id")
    p.add_argument("--format", default="yaml", choices=("yaml", "junit", "tap13", "csv"))
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("bundle", help="move a job's results between masters (results bundles)")
    bundle = p.add_subparsers(dest="bundle_command", required=True)
    p = bundle.add_parser("download", help="a job's results bundle (YAML with its source and uuid)")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (default: stdout)")
    p.set_defaults(func=_cmd_bundle_download)
    p = bundle.add_parser("upload", help="import a bundle from another master as a job of this one")
    p.add_argument("file", metavar="FILE", help="the bundle ('-': stdin)")
    p.set_defaults(func=_cmd_bundle_upload)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(args.config)
    url = args.url or os.environ.get("PUMICE_URL") or config.get("url")
    token = args.token or os.environ.get("PUMICE_TOKEN") or config.get("token")
    if not url:
        print("pumice: no master URL: give --url, set PUMICE_URL or url: in ~/.config/pumice.yaml",
              file=sys.stderr)
        return EXIT_REFUSED
    client = Client(url, token)
    try:
        return args.func(client, args)
    except ApiError as exc:
        print(f"pumice: {exc.describe()}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, http.client.HTTPException) as exc:
        print(f"pumice: cannot reach the master at {client.url}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TimeoutError as exc:
        print(f"pumice: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
