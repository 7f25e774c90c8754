"""``pumice-site``: build the static site from an artifact store, or import a bundle into a store.

pumice-site build [--incremental] --store DIR --out DIR [--instance NAME] [--base-url URL]
                  [--templates DIR]... [--processes N]
pumice-site publish --store DIR --out DIR JOB_ID
pumice-site import-bundle --store DIR BUNDLE.yaml
pumice-site demo --out DIR [--jobs N]       a generated store and its site, to look at
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("pumice.sitegen")


def _site_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="the artifact store (the master's DATA/store)")
    parser.add_argument("--out", required=True, help="the site directory nginx serves")
    parser.add_argument("--instance", default="", help="this instance's name (default: the host name)")
    parser.add_argument("--base-url", default="", help="the site's public URL, for bundle headers")
    parser.add_argument(
        "--templates",
        action="append",
        default=[],
        help="a directory of templates overriding the packaged ones (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pumice-site``."""
    parser = argparse.ArgumentParser(prog="pumice-site", description="Pumice static results site")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the whole site from the store")
    _site_args(build)
    build.add_argument(
        "--incremental", action="store_true", help="only re-render jobs whose files changed since the last build"
    )
    build.add_argument("--processes", type=int, default=None, help="render jobs in N processes")
    publish = sub.add_parser("publish", help="publish one job and the lists it appears in")
    _site_args(publish)
    publish.add_argument("job_id", type=int)
    imp = sub.add_parser("import-bundle", help="import a downloaded results bundle as a new job")
    imp.add_argument("--store", required=True)
    imp.add_argument("--submitter", default=None)
    imp.add_argument("bundle", help="a results.yaml downloaded from a Pumice site ('-' for stdin)")
    demo = sub.add_parser("demo", help="generate a store of sample jobs and build its site")
    demo.add_argument("--out", required=True, help="directory for store/ and site/")
    demo.add_argument("--jobs", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )

    from results.imports import BundleImportError, import_bundle
    from sitegen.build import build_site, publish_job
    from sitegen.model import SiteError

    try:
        if args.command == "build":
            report = build_site(
                args.store,
                args.out,
                incremental=args.incremental,
                instance=args.instance,
                base_url=args.base_url,
                template_dirs=args.templates,
                processes=args.processes,
            )
            print(
                f"{args.out}: {report.rendered} jobs rendered, {report.skipped} unchanged, "
                f"{report.written} files written, {report.removed} removed in {report.seconds:.2f} s"
            )
            for error in report.errors:
                print(f"error: {error}", file=sys.stderr)
            return 1 if report.errors else 0
        if args.command == "publish":
            report = publish_job(
                args.store,
                args.out,
                args.job_id,
                instance=args.instance,
                base_url=args.base_url,
                template_dirs=args.templates,
            )
            print(f"job {args.job_id}: {report.written} files in {report.seconds * 1000:.0f} ms")
            return 0
        if args.command == "import-bundle":
            text = sys.stdin.read() if args.bundle == "-" else Path(args.bundle).read_text(encoding="utf-8")
            imported = import_bundle(args.store, text, submitter=args.submitter)
            state = "imported as" if imported.created else "already imported as"
            print(f"{args.bundle}: {state} job {imported.job_id}")
            return 0
        if args.command == "demo":
            from sitegen.fixtures import make_store

            out = Path(args.out)
            make_store(out / "store", args.jobs, cases=30, log_lines=3000)
            report = build_site(
                out / "store", out / "site", instance="demo.pumice.local", base_url="http://127.0.0.1:8080/"
            )
            print(f"{out / 'site'}/index.html: {report.rendered} jobs in {report.seconds:.2f} s")
            return 0
    except (SiteError, BundleImportError, OSError) as exc:
        print(f"pumice-site: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
