"""The bounded loader (results.bounded): every LAVA job of the corpus parses under the default
limits; each kind of hostile document is refused while it is parsed, with its path, its line and
the name of the limit, in milliseconds; the same with PyYAML's own parser (a worker without libyaml).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from memory import TreeMeter
from support.hostile import alias_bomb, bomb_job

from agent.errors import JobDefinitionError, JobError
from agent.job import parse_job
from results import bounded
from results.bounded import DEFAULT_LIMITS, LimitExceeded, Limits, bounded_loader, load, load_data, load_json
from results.bundle import load_bundle
from results.record import Result

PURE = bounded_loader(yaml.SafeLoader)


def refusal(text: str, limits: Limits = DEFAULT_LIMITS, loader: type | None = None) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        if loader is None:
            load(text, limits)
        else:
            instance = loader(text, limits)
            try:
                instance.construct_document(instance.load_node())
            finally:
                instance.dispose()
    return caught.value


def test_every_job_of_the_lava_corpus_parses_under_the_default_limits(lava_corpus: Path) -> None:
    files = sorted((lava_corpus / "sample-jobs").glob("*.yaml")) + sorted(
        (lava_corpus / "scheduler-sample-jobs").glob("*.yaml"))
    assert len(files) > 40
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert load(text).data == yaml.load(text, Loader=yaml.CSafeLoader), path.name
        try:
            parse_job(text)
        except JobDefinitionError as exc:  # what Pumice does not implement, never a limit
            assert not [f for f in exc.faults if "(limit " in f.message], (path.name, exc.faults)


@pytest.mark.parametrize("loader", [None, PURE], ids=["libyaml", "pyyaml"])
def test_a_kilobyte_alias_bomb_is_refused_in_milliseconds_with_its_path_and_line(loader: type | None) -> None:
    text = bomb_job("metadata")
    start = time.perf_counter()
    exc = refusal(text, loader=loader)
    assert time.perf_counter() - start < 0.05
    assert exc.limit == "max_nodes" and exc.path == ("metadata", "e")
    assert exc.line == text.splitlines().index("  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]") + 1
    assert str(exc).startswith("metadata.e: 66430 values once its aliases are expanded; at most 10000")


@pytest.mark.parametrize("loader", [None, PURE], ids=["libyaml", "pyyaml"])
def test_each_limit_is_named_with_the_path_of_the_fault(loader: type | None) -> None:
    small = Limits(max_aliases=3, max_depth=5, max_nodes=50, max_string=10, max_expanded_bytes=100, max_int_digits=5)
    cases = {
        "a: &x [1]\nb: [*x, *x, *x, *x]\n": ("max_aliases", ("b",)),
        "a: [[[[[[1]]]]]]\n": ("max_depth", ("a", 0, 0, 0, 0)),
        "a: &x [[1]]\nb: &y [*x]\nc: [[[*y]]]\n": ("max_depth", ("c", 0)),  # deep only through aliases
        "a: [" + ", ".join(["1"] * 60) + "]\n": ("max_nodes", ("a", 47)),
        "a: 12345678901\n": ("max_string", ("a",)),
        "a: &x 123456789\nb: [*x, *x]\nc: [*x]\n" + "d: [xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, "
        "xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx]\n": ("max_expanded_bytes", ()),
        "a: 123456\n": ("max_int_digits", ("a",)),
        "a: &x [1, *x]\n": ("max_depth", ("a",)),  # an alias to its ancestor
    }
    for text, (limit, path) in cases.items():
        exc = refusal(text, small, loader)
        assert (exc.limit, exc.path) == (limit, path), (text, str(exc))
        assert exc.line and f"(limit {limit})" in exc.message


def test_a_document_over_max_bytes_is_refused_before_it_is_parsed() -> None:
    exc = refusal("a: " + "é" * 400 + "\n", Limits(max_bytes=500))
    assert exc.limit == "max_bytes" and "804 bytes" in exc.message and exc.line == 1


def test_composing_stops_at_max_nodes_whatever_the_size_of_the_document() -> None:
    text = "[" + ", ".join(["1"] * 200_000) + "]"
    start = time.perf_counter()
    exc = refusal(text, Limits(max_bytes=len(text)))
    assert exc.limit == "max_nodes" and exc.path == (9999,)
    assert time.perf_counter() - start < 0.5


def test_documents_within_the_limits_load_as_yaml_safe_load_loads_them() -> None:
    text = "a: &x {b: [1, 2.5, true, null, 0x1f, 2024-01-02]}\nc: *x\nd: {<<: *x, e: f}\n'?': !!binary aGk=\n"
    assert load_data(text) == yaml.safe_load(text)
    assert load(text).node.value[0][0].value == "a"
    assert load_data("") is None


def test_json_bodies_are_bounded_in_depth_and_integers() -> None:
    assert load_json('{"a": [1, {"b": "c"}], "d": 12}') == {"a": [1, {"b": "c"}], "d": 12}
    assert load_json("[" * 64 + "]" * 64) is not None
    for text, limit in (("[" * 65 + "]" * 65, "max_depth"), ("[" * 100_000 + "]" * 100_000, "max_depth"),
                        ('{"a": ' + "9" * 5000 + "}", "max_int_digits")):
        with pytest.raises(LimitExceeded) as caught:
            load_json(text, Limits(max_bytes=1 << 20))
        assert caught.value.limit == limit
    with pytest.raises(json.JSONDecodeError):
        load_json('{"a": }')


def test_limits_are_named_settings_with_checked_values() -> None:
    assert Limits().parse(["max_aliases=5", "max-depth=10"]) == Limits(max_aliases=5, max_depth=10)
    for bad in (["max_aliases"], ["max_aliases=x"], ["max_alias=3"], ["max_depth=0"], ["max_depth=" + "9" * 30]):
        with pytest.raises(ValueError):
            Limits().parse(bad)
    assert set(Limits.names()) >= {"max_bytes", "max_depth", "max_nodes", "max_expanded_bytes", "max_aliases",
                                   "max_string", "max_int_digits", "max_actions", "max_timeout"}


def test_a_bundle_in_its_own_layout_is_read_line_by_line_as_yaml_reads_it_at_a_few_times_its_size() -> None:
    import tracemalloc

    from results.bundle import BundleHeader, _load_lines, _load_yaml, dump_bundle

    results = [Result(job="3", level=f"3.{n % 50}", suite="s", case=f"c{n}", result="pass", measurement=n * 1e-7,
                      units="s", extra={"é": [1, None, "x\u2028y"], "n": {"deep": [n]}}) for n in range(5_000)]
    text = dump_bundle("3", results, BundleHeader("lab", "http://lab/jobs/3/", "u"))
    lines = _load_lines(text, DEFAULT_LIMITS)
    assert lines is not None and len(lines.results) == 5_000
    assert lines == _load_yaml(text, DEFAULT_LIMITS.replace(max_bytes=10**9, max_nodes=10**7, max_expanded_bytes=10**9))
    tracemalloc.start()
    try:
        load_bundle(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(text), peak / len(text)


def test_a_bundle_in_another_layout_is_yaml_within_the_limits_of_any_document() -> None:
    bomb = ("job: '3'\nbomb:\n" + alias_bomb(indent="  ")
            + "results:\n  '1':\n  - {suite: s, case: c, result: pass, extra: {x: *i}}\n")
    with pytest.raises(ValueError, match="limit max_nodes"):
        load_bundle(bomb)
    block = "job: '3'\nresults:\n  '1':\n" + "".join(f"  - suite: s\n    case: c{n}\n    result: pass\n"
                                                     for n in range(100))
    assert len(load_bundle(block).results) == 100
    junk = "job: \"3\"\nresults:\n  \"1\":\n  - [" + ", ".join(["{}"] * 100_000) + "]\n"
    with pytest.raises(ValueError, match="limit max_nodes"):
        load_bundle(junk)
    many = json.dumps({"suite": "s", "case": "c", "result": "pass", "extra": {"x": ["ab"] * 100_000}})
    junk = f'job: "3"\nresults:\n  "1":\n  - {many}\n'
    with pytest.raises(ValueError, match="line 4: more than 10000 values in one result"):
        load_bundle(junk)


def test_a_fetched_test_definition_over_a_limit_is_a_job_error(tmp_path: Path) -> None:
    from agent.actions.deploy.overlay import RepoAction

    (tmp_path / "bomb.yaml").write_text("metadata:\n" + alias_bomb(indent="  "))
    action = RepoAction(0, 0, {"name": "bomb", "path": "bomb.yaml", "repository": "http://example.org/t.git"})
    with pytest.raises(JobError, match="limit max_nodes"):
        action.load(tmp_path)


def test_the_site_shows_no_metadata_of_a_stored_job_over_a_limit() -> None:
    from sitegen.model import JobView

    job = JobView(id=1, meta={}, stamp="")
    job.definition = bomb_job("metadata")
    assert job.job_metadata() == {}
    job.definition = "metadata:\n  build: '42'\n"
    assert job.job_metadata() == {"build": "42"}


def test_the_tree_meter_counts_a_child_that_grows_and_dies() -> None:
    import subprocess
    import sys

    # a parent that starts a child which grows by 40 MB, lives a little and dies
    child = "import time; x = bytearray(40 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.3)"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; time.sleep(0.3); "
                               f"subprocess.run([sys.executable, '-c', {child!r}]); time.sleep(0.2)"])
    try:
        time.sleep(0.1)
        meter = TreeMeter(parent.pid).start()
        parent.wait(20)
        assert meter.stop() > 40 * 1024
    finally:
        parent.kill()
        parent.wait()


def test_bounded_keeps_libyaml_as_its_parser() -> None:
    assert bounded.BoundedLoader.__mro__[2] is getattr(yaml, "CSafeLoader", yaml.SafeLoader)
