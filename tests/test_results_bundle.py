"""The results bundle: dump/load round trip, golden file, shape, errors with line numbers."""

from __future__ import annotations

import pytest
import yaml
from golden import check_golden
from test_results_samples import sample_results

from results.bundle import Bundle, BundleError, BundleHeader, dump_bundle, load_bundle, write_bundle
from results.record import Result

HEADER = BundleHeader("lab-a", "https://lab-a.example.org/scheduler/job/42", "5b0e7f62-3f0d-4c1e-9a51-0d6b1f2c7a10")


def test_golden_bundle() -> None:
    text = dump_bundle("42", sample_results(), HEADER)
    check_golden("results/bundle.yaml", text)


def test_round_trip_keeps_every_result() -> None:
    results = sample_results()
    bundle = load_bundle(dump_bundle("42", results, HEADER))
    assert isinstance(bundle, Bundle)
    assert bundle.job == "42" and bundle.header == HEADER
    assert sorted(bundle.results, key=repr) == sorted(results, key=repr)
    again = load_bundle(dump_bundle("42", bundle.results, bundle.header))
    assert again == bundle


def test_shape_levels_sorted_numerically_and_job_result_first() -> None:
    text = dump_bundle("42", sample_results(), HEADER)
    lines = text.splitlines()
    assert lines[:4] == [
        "# Pumice results bundle",
        "# instance: lab-a",
        "# job: https://lab-a.example.org/scheduler/job/42",
        "# uuid: 5b0e7f62-3f0d-4c1e-9a51-0d6b1f2c7a10",
    ]
    data = yaml.safe_load(text)
    assert data["job"] == "42"
    assert data["source"] == {"instance": "lab-a", "url": HEADER.url, "uuid": HEADER.uuid}
    assert list(data["results"]) == ["0", "1", "1.1", "1.2", "1.10", "2", "2.4.1", "3.1"]
    assert data["results"]["0"] == [
        {
            "suite": "lava",
            "case": "job",
            "result": "fail",
            "extra": {
                "error_type": "TestError",
                "error_msg": 'lava-test-raise: "boom"\nsecond line <b>&\x1b[0m\x00',
            },
        }
    ]
    measurements = [r["measurement"] for r in data["results"]["3.1"] if "measurement" in r]
    assert measurements == [4.25, 123456.789, -0.5, 99.0, 1e-7]  # numbers, also for plain YAML readers
    assert all(type(m) is float for m in measurements)
    first = data["results"]["3.1"][0]
    assert list(first) == ["suite", "case", "result", "duration"] and "job" not in first


def test_bundle_without_header_and_without_results(tmp_path) -> None:
    text = dump_bundle("9", [])
    assert "source" not in yaml.safe_load(text)
    assert load_bundle(text) == Bundle("9", None, [])
    write_bundle(tmp_path / "results.yaml", "9", [], None)
    assert load_bundle((tmp_path / "results.yaml").read_text()) == Bundle("9", None, [])
    assert [p.name for p in tmp_path.iterdir()] == ["results.yaml"]  # no temporary file left


def test_a_hand_written_block_style_bundle_loads() -> None:
    text = """# written by hand
job: 12
source:
  instance: other
  url: http://other/job/12
  uuid: abc
results:
  1.10:
    - suite: lava
      case: http-download
      result: pass
      duration: 1.5
  0:
    - {suite: lava, case: job, result: pass}
  3.1:
    - suite: 0_smoke
      case: pwd
      result: fail
      measurement: 3
      units: ms
      set: basic
      extra: {note: yes}
"""
    bundle = load_bundle(text)
    assert bundle.job == "12" and bundle.header == BundleHeader("other", "http://other/job/12", "abc")
    assert bundle.results == [
        Result("12", "1.10", "lava", "http-download", "pass", duration=1.5),
        Result("12", "0", "lava", "job", "pass"),
        Result(
            "12",
            "3.1",
            "0_smoke",
            "pwd",
            "fail",
            measurement=3.0,
            units="ms",
            set="basic",
            extra={"note": True},
        ),
    ]


def test_nasty_header_values_stay_in_their_comment() -> None:
    header = BundleHeader("lab\n# injected: yes", "http://x/\r\n<script>", "u")
    text = dump_bundle("1", [], header)
    assert "\n# injected" not in text
    assert load_bundle(text).header == header


def test_results_of_another_job_are_refused() -> None:
    with pytest.raises(ValueError, match="belongs to job 43, not to job 42"):
        dump_bundle("42", [Result("43", "1", "s", "c", "pass")])


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("job: 1\nresults: [\n", 3, "not valid YAML"),
        ("- a list\n", 1, "a bundle is a mapping with job, source and results"),
        ("", 1, "a bundle is a mapping"),
        ("results: {}\n", 1, "the bundle has no 'job'"),
        ("job: 1\n", 1, "the bundle has no 'results'"),
        (
            "job: 1\nresults:\n  - {suite: s}\n",
            3,
            "'results' must be a mapping of level to a list of results",
        ),
        ("job: 1\nresults:\n  '1': {suite: s}\n", 3, "level 1: expected a list of results"),
        (
            "job: 1\nresults:\n  '1':\n  - {suite: s, case: c, result: pass}\n"
            "  '2':\n  - {suite: s, case: c, result: maybe}\n",
            6,
            "level 2: result of case 'c' is 'maybe'; allowed: pass, fail, skip, unknown",
        ),
        (
            "job: 1\nresults:\n  '1':\n  - {suite: s, case: c, result: pass, colour: red}\n",
            4,
            "unknown result field",
        ),
        (
            "job: 1\nresults:\n  '1':\n\n\n  - {suite: s, case: 'a b', result: pass}\n",
            6,
            "case 'a b' contains ' '",
        ),
        (
            "job: 1\nresults:\n  one:\n  - {suite: s, case: c, result: pass}\n",
            4,
            "level of case 'c' is 'one'",
        ),
        ("job: 1\nresults:\n  '1':\n  - just text\n", 4, "a result must be a mapping"),
        (
            "job: 1\nresults:\n  '1':\n  - {suite: s, case: c, result: pass, level: '2'}\n",
            4,
            "result says level '2'",
        ),
        ("job: 1\nresults:\n  '1':\n  - {suite: s, case: c, result: pass, job: 2}\n", 4, "belongs to job 2"),
        ("job: 1\nsource: {instance: a}\nresults: {}\n", 2, "'source' lacks url, uuid"),
        ("job: [1]\nresults: {}\n", 1, "'job' must be the job id"),
    ],
)
def test_malformed_bundles_say_what_and_where(text: str, line: int, message: str) -> None:
    with pytest.raises(BundleError) as caught:
        load_bundle(text)
    assert caught.value.line == line, str(caught.value)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"line {line}: ")
