"""Property-based tests (hypothesis) of the job parser and validator, and of the REST and XML-RPC
submission paths of a real running master, seeded from LAVA's corpus jobs and ours, mutated.

Properties, for every mutated job:

- the parser and validator (``agent.job.validate_job``) return faults, never raise, in under a
  second, and every fault names a path or a line;
- the master answers a submission over REST or XML-RPC with a 201 or a 4xx, never a 5xx (nor
  XML-RPC's internal error), in under a second; a 400 names a path or a line for each fault;
- the peak memory growth of the master's process tree stays within the budget: 5 MB, plus for
  a job it keeps, a small constant times its size;
- any XML-RPC method called with arbitrary arguments answers a result or a 4xx fault.

``make test`` runs a fixed, small number of examples (:data:`EXAMPLES`); ``make fuzz`` many more
(``PUMICE_FUZZ_EXAMPLES``). Every finding becomes a named regression test elsewhere
(tests/test_hostile_input.py, tests/test_results_bounded.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.hostile import BUDGET_KB, BUDGET_SECONDS, MasterProcess, alias_bomb
from support.master import CORPUS, job_text

from agent.job import validate_job

ROOT = Path(__file__).resolve().parent.parent
#: examples per property: a few in ``make test``, many under ``make fuzz``
EXAMPLES = int(os.environ.get("PUMICE_FUZZ_EXAMPLES", "25"))
#: the same examples in every ``make test`` (derandomized); new ones under ``make fuzz``
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="PUMICE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
#: what a kept job may cost the master beyond the budget, per byte of its text
PER_BYTE = 100


def _seeds() -> list[str]:
    seeds = [job_text("fuzz seed"), (ROOT / "tests" / "data" / "smoke-job.yaml").read_text(encoding="utf-8")]
    for folder in ("sample-jobs", "scheduler-sample-jobs"):
        seeds += [p.read_text(encoding="utf-8") for p in sorted((CORPUS / folder).glob("*.yaml"))]
    return seeds


SEEDS = _seeds()

# ---- mutations ----

#: texts that YAML, the schema or the limits treat specially
SNIPPETS = ["&x ", "*x", "<<: *x", "[", "]", "{", "}", ": ", "- ", "!!binary ", "!!python/object ", "? ", "|\n",
            "'", '"', "\\", "\t", "\n", "#", "%YAML 1.1\n", "---\n", "...\n", "~", "null", "1e999", ".nan",
            "9" * 120, "-0x" + "f" * 99, "0b" + "1" * 99, "1:2:3:4:5", "2024-13-45", "\ufeff", "\x00", "é",
            "[" * 80 + "]" * 80, "x" * 70_000, "minutes: " + "9" * 40, "priority: 1000", "job_limit: -1"]

LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**18, max_value=10**120)
          | st.floats(allow_nan=True) | st.text(max_size=40) | st.sampled_from(["x" * 70_000, "9" * 200]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=20)


@st.composite
def text_mutation(draw: st.DrawFn, text: str) -> str:
    """An edit of the text: insert a snippet or random text, delete a span, repeat a line, truncate."""
    kind = draw(st.sampled_from(["insert", "delete", "repeat", "truncate", "bomb"]))
    where = draw(st.integers(0, len(text)))
    if kind == "insert":
        piece = draw(st.sampled_from(SNIPPETS) | st.text(max_size=12))
        return text[:where] + piece + text[where:]
    if kind == "delete":
        return text[:where] + text[where + draw(st.integers(1, 40)):]
    if kind == "repeat":
        lines = text.splitlines(keepends=True)
        index = draw(st.integers(0, max(0, len(lines) - 1)))
        return "".join(lines[:index] + lines[index:index + 1] * draw(st.integers(2, 200)) + lines[index:])
    if kind == "truncate":
        return text[:where]
    section = draw(st.sampled_from(["metadata", "context", "environment", "protocols", "notify"]))
    return text + f"{section}:\n" + alias_bomb(draw(st.integers(2, 10)), draw(st.integers(2, 12)), "  ")


def _paths(data: object) -> list[tuple]:
    """The paths to every value of ``data``, each container visited once (a mutation may have
    put a list inside itself: the dumper writes that as an alias to its own anchor)."""
    found: list[tuple] = []
    seen: set[int] = set()
    stack: list[tuple[object, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        found.append(path)
        if isinstance(value, dict | list) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((child, path + (key,)) for key, child in items)
    return found


def _put(data: object, path: tuple, value: object) -> object:
    if not path:
        return value
    parent = data
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    parent[path[-1]] = value  # type: ignore[index]
    return data


@st.composite
def data_mutation(draw: st.DrawFn, text: str) -> str:
    """An edit of the data: a value replaced by another (sometimes the same object at two places,
    which the dumper writes as an anchor and an alias), dumped back to YAML."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    paths = _paths(data)
    value = draw(VALUES)
    data = _put(data, draw(st.sampled_from(paths)), value)
    if isinstance(value, list | dict) and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 50))):
            spots = _paths(data)
            data = _put(data, draw(st.sampled_from(spots)), value) if len(spots) > 1 else data
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=draw(st.booleans()))
    except (yaml.YAMLError, RecursionError, ValueError):
        return text


@st.composite
def mutated_job(draw: st.DrawFn) -> str:
    """A corpus or test job with one to four mutations."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        text = draw(data_mutation(text) if draw(st.booleans()) else text_mutation(text))
    return text


# ---- properties ----

@pytest.fixture(scope="module")
def device() -> dict:
    from master.devicetypes import DeviceTypes

    dictionary = (ROOT / "tests" / "data" / "qemu-amd64.jinja2").read_text()
    return DeviceTypes(template_dirs=[ROOT / "device-types"]).device_config(dictionary, context={"arch": "amd64"})


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterProcess]:
    proc = MasterProcess(tmp_path_factory.mktemp("fuzz")).start()
    try:
        for n in range(3):
            assert proc.submit(job_text(f"warm-up {n}"), measure=False).status == 201
        yield proc
    finally:
        proc.stop()


def names_where(faults: list[dict]) -> bool:
    return bool(faults) and all(f.get("path") or f.get("line") for f in faults)


@FUZZ
@given(text=mutated_job())
def test_the_parser_and_validator_return_faults_with_a_path_in_under_a_second(device: dict, text: str) -> None:
    start = time.perf_counter()
    faults = validate_job(text, device)
    assert time.perf_counter() - start < BUDGET_SECONDS
    assert all(f.path or f.line for f in faults), faults


def _within_budget(status: int, growth_kb: int, size: int) -> bool:
    return growth_kb * 1024 < BUDGET_KB * 1024 + (PER_BYTE * size if status < 300 else 0)


@FUZZ
@given(text=mutated_job())
def test_a_rest_submission_is_a_201_or_a_400_naming_where_within_the_budget(master: MasterProcess,
                                                                           text: str) -> None:
    answer = master.submit(text)
    assert answer.status in (201, 400, 413), (answer.status, answer.text[:2000])
    assert answer.seconds < BUDGET_SECONDS, answer.seconds
    assert _within_budget(answer.status, answer.growth_kb, len(text.encode())), answer.growth_kb
    if answer.status == 400:
        assert names_where(answer.json()["faults"]), answer.text[:2000]


@FUZZ
@given(text=mutated_job())
def test_an_xml_rpc_submission_is_a_job_id_or_a_4xx_fault_within_the_budget(master: MasterProcess,
                                                                            text: str) -> None:
    result, answer = master.rpc(master.rpc_body("scheduler.jobs.submit", text))
    assert answer.status == 200 and answer.seconds < BUDGET_SECONDS, (answer.status, answer.seconds)
    if not isinstance(result, int):
        assert result.faultCode in (400, 413), result
    assert _within_budget(200 if isinstance(result, int) else 400, answer.growth_kb, len(text.encode()))


#: what xmlrpc.client can send: integers of 32 bits (larger ones are sent by hand in test_hostile_input)
INTS = st.integers(min_value=-(2**31), max_value=2**31 - 1)
ARGUMENTS = st.lists(st.none() | st.booleans() | INTS
                     | st.text(max_size=30) | st.lists(st.text(max_size=5) | INTS, max_size=3)
                     | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), max_size=5)


@FUZZ
@given(method=st.sampled_from(sorted(__import__("master.xmlrpc", fromlist=["METHODS"]).METHODS)),
       params=ARGUMENTS)
def test_any_xml_rpc_method_with_any_arguments_answers_a_result_or_a_4xx_fault(master: MasterProcess,
                                                                              method: str, params: list) -> None:
    result, answer = master.rpc(master.rpc_body(method, *params))
    assert answer.status == 200 and answer.seconds < BUDGET_SECONDS, answer
    if hasattr(result, "faultCode"):
        assert 400 <= result.faultCode < 500 or result.faultCode == -32601, (method, params, result)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["description", "health", "job_limit"]),
                              st.none() | st.booleans() | st.integers() | st.text(max_size=30)
                              | st.floats() | st.lists(st.integers(), max_size=3), max_size=3))
def test_a_json_body_of_any_values_is_a_200_or_a_4xx(master: MasterProcess, fields: dict) -> None:
    answer = master.request("PUT", "/api/v0.2/workers/w1/", json.dumps(fields), user="admin",
                            content_type="application/json")
    assert answer.status in (200, 400), (fields, answer.status, answer.text[:500])
    assert answer.growth_kb < BUDGET_KB
