"""``make bench``: every benchmark of the project, each printing its medians.

Each area has a module ``tools/bench_<area>.py`` with a ``main()``; an area that fails is reported
and the others still run.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

AREAS = ["agent", "uboot", "master", "broker", "site", "notify"]


def main(argv: list[str]) -> int:
    wanted = argv or AREAS
    del sys.argv[1:]  # the areas' own option parsers see no options: each runs with its defaults
    failed = []
    for area in wanted:
        print(f"== {area}", flush=True)
        try:
            module = importlib.import_module(f"bench_{area}")
        except ModuleNotFoundError:
            print(f"  no benchmark for {area} yet")
            continue
        try:
            module.main()
        except BaseException:  # report and go on with the other areas
            traceback.print_exc()
            failed.append(area)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
