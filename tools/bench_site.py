"""The static site's `make bench` figures (issue 5).

- full build of 2,000 jobs of 50 cases and 2,000 log lines each (target: under 60 s);
- incremental publish of one finished job into that site (target: under 200 ms, median of several);
- the lab-now page republished (200 devices, 20 workers, 50 running, 200 queued; target: under 100 ms);
- the log page of a 100,000-line log: render time, page size (raw and gzipped) and time to first
  byte through a real nginx with deploy/nginx/pumice-site.conf.

Run: ``.venv/bin/python tools/bench_site.py [--jobs N] [--keep DIR]`` (the lead's tools/bench.py calls main()).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results.log import LogRecord  # noqa: E402
from results.logfile import LogFile  # noqa: E402
from sitegen import build_site, publish_job, publish_lab  # noqa: E402
from sitegen.fixtures import JobSpec, make_job, make_lab_model, make_store  # noqa: E402
from sitegen.logpage import render_log  # noqa: E402


def _big_log(path: Path, lines: int) -> None:
    """A 100,000-line LAVA-style log: mostly console output, dispatcher messages, results."""
    kinds = ("target", "target", "target", "debug", "info", "target", "results")
    records = []
    for n in range(lines):
        kind = kinds[n % len(kinds)]
        dt = f"2023-01-10T{10 + n // 360000:02d}:{n // 6000 % 60:02d}:{n // 100 % 60:02d}.{n % 100:02d}0000"
        if kind == "results":
            msg: object = {
                "case": f"case-{n}",
                "definition": "0_stress",
                "result": "pass",
                "measurement": n % 97,
                "units": "ms",
            }
        elif kind == "target":
            msg = f"[{n / 1000:12.6f}] stress-ng: info:  [{1000 + n % 64}] dispatching hogs: 4 cpu, 2 vm <ok>"
        else:
            msg = f"stress action {n}: waiting for prompt '/ # ' (timeout 00:05:00)"
        records.append(LogRecord(dt, kind, msg))
    with LogFile(path) as log:
        log.append(records)


def _ttfb(url: str, runs: int = 5) -> tuple[float, int]:
    """Median time to first byte (s) of ``url`` with curl, and the bytes transferred gzipped."""
    times, size = [], 0
    for _ in range(runs):
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "--compressed", "-w", "%{time_starttransfer} %{size_download}", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ttfb, size_text = out.stdout.split()
        times.append(float(ttfb))
        size = int(size_text)
    return statistics.median(times), size


def main(argv: list[str] | None = None) -> int:
    """Print the site's bench figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--big-log", type=int, default=100_000)
    parser.add_argument("--keep", help="build in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pumice-bench-site-"))
    try:
        print(f"site bench in {work} ({os.cpu_count()} CPUs)")
        started = time.perf_counter()
        store = make_store(
            work / "store", args.jobs, cases=args.cases, log_lines=args.lines, nasty=False, variants=min(40, args.jobs)
        )
        print(
            f"  fixture: {args.jobs} jobs x {args.cases} cases x {args.lines} log lines "
            f"generated in {time.perf_counter() - started:.1f} s"
        )

        report = build_site(
            store.root, work / "site", instance="bench.example.org", base_url="http://bench.example.org/"
        )
        status = "OK" if report.seconds < 60 else "OVER TARGET"
        print(
            f"  full build: {report.rendered} jobs, {report.written} files in {report.seconds:.1f} s "
            f"(target < 60 s: {status})"
        )

        times, cpu_times = [], []
        next_id = max(store.job_ids()) + 1
        for n in range(7):
            job_id = next_id + n
            make_job(store, JobSpec(job_id, "qemu", "qemu-01", "worker-a", "complete", args.cases, args.lines))
            begun, cpu = time.perf_counter(), time.process_time()
            publish_job(
                store.root, work / "site", job_id, instance="bench.example.org", base_url="http://bench.example.org/"
            )
            times.append(time.perf_counter() - begun)
            cpu_times.append(time.process_time() - cpu)
        median = statistics.median(times)
        status = "OK" if median < 0.2 else "OVER TARGET"
        print(
            f"  incremental publish of one finished job: median {median * 1000:.0f} ms "
            f"({statistics.median(cpu_times) * 1000:.0f} ms CPU), max {max(times) * 1000:.0f} ms over "
            f"{len(times)}, the first one compiling the templates (target < 200 ms: {status})"
        )
        lab = make_lab_model()
        lab_times = []
        for n in range(9):
            lab["as_of"] = f"2024-05-01T10:00:{n:02d}.000000Z"
            lab_times.append(publish_lab(store.root, work / "site", lab, instance="bench.example.org"))
        median = statistics.median(lab_times)
        status = "OK" if median < 0.1 else "OVER TARGET"
        print(
            f"  lab-now republish ({len(lab['devices'])} devices, {len(lab['workers'])} workers, "
            f"{len(lab['running'])} running, {len(lab['queued'])} queued): median {median * 1000:.0f} ms, "
            f"max {max(lab_times) * 1000:.0f} ms over {len(lab_times)} (target < 100 ms: {status})"
        )
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1):
            print(f"  (load average {load:.1f} on {os.cpu_count()} CPUs: wall-clock figures are inflated)")

        big = work / "big"
        big.mkdir(parents=True, exist_ok=True)
        big_store = make_store(big / "store", 1, cases=10, log_lines=50, nasty=False)
        log_path = big_store.job_dir(1) / "output.yaml"
        log_path.unlink()
        log_path.with_suffix(".idx").unlink()
        _big_log(log_path, args.big_log)
        begun = time.perf_counter()
        rendered = render_log(log_path)
        render_s = time.perf_counter() - begun
        publish = publish_job(big_store.root, big / "site", 1, instance="bench.example.org")
        first = big / "site/jobs/1/log.html"
        pages = sorted((big / "site/jobs/1").glob("log*.html"))
        raw = first.stat().st_size
        zipped = len(gzip.compress(first.read_bytes(), 5))
        print(
            f"  {args.big_log:,}-line log: rendered in {render_s:.2f} s into {len(rendered.pages)} pages "
            f"(job published in {publish.seconds:.2f} s); raw log {log_path.stat().st_size / 1e6:.1f} MB"
        )
        print(
            f"    first log page: {raw / 1024:.0f} kB ({zipped / 1024:.0f} kB gzipped); "
            f"all pages {sum(p.stat().st_size for p in pages) / 1e6:.1f} MB"
        )
        if shutil.which("nginx") and shutil.which("curl"):
            sys.path.insert(0, str(ROOT / "tests"))
            from test_site_nginx import serve_site

            with serve_site(big / "site", big / "nginx") as url:
                ttfb, size = _ttfb(f"{url}/jobs/1/log.html")
                last_ttfb, _ = _ttfb(f"{url}/jobs/1/{pages[-1].name}")
            print(
                f"    nginx on loopback: time to first byte {ttfb * 1000:.1f} ms for the first page "
                f"({size / 1024:.0f} kB sent gzipped), {last_ttfb * 1000:.1f} ms for the last page"
            )
        else:
            print("    (nginx or curl missing: no time-to-first-byte figure)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
