"""The pipeline core without a board: levels, timeout precedence, retries, errors, finalize."""

from __future__ import annotations

import pytest
import yaml

from agent.errors import Bug, InfrastructureError, JobError, JobTimeout, TestError
from agent.job import Job, parse_job, validate_job
from agent.pipeline import Action, Pipeline, RetryAction, register, strategy
from agent.timeout import Deadline, format_duration, parse_duration

JOB = """
device_type: qemu
job_name: pipeline
timeouts:
  job: {minutes: 10}
  action: {minutes: 2}
  connection: {seconds: 20}
  actions:
    fake-child: {seconds: 45}
visibility: public
actions:
- command:
    name: touch
    timeout: {minutes: 3}
"""

DEVICE = {
    "timeouts": {"actions": {"fake-child": {"seconds": 40}, "fake-parent": {"seconds": 50}},
                 "connections": {"fake-child": {"seconds": 7}}},
    "commands": {"users": {"touch": {"do": "true", "undo": "true"}}},
}


class Child(Action):
    name = "fake-child"

    def __init__(self, behaviour=None):
        super().__init__()
        self.behaviour = behaviour or []
        self.calls = 0

    def run(self, connection, deadline):
        self.calls += 1
        if self.behaviour:
            error = self.behaviour.pop(0)
            if error:
                raise error
        return connection


class Parent(RetryAction):
    name = "fake-parent"

    def __init__(self, children):
        super().__init__()
        self.children = children

    def populate(self, parameters):
        super().populate(parameters)
        pipeline = self.child_pipeline(parameters)
        for child in self.children:
            pipeline.add(child)


def make_job(text: str = JOB) -> Job:
    data, doc = parse_job(text)
    return Job("7", data, DEVICE, doc=doc)


def test_levels_and_timeout_precedence() -> None:
    job = make_job()
    a, b = Child(), Child()
    parent = job.pipeline.add(Parent([a, b]), {"timeout": {"minutes": 1}})
    other = job.pipeline.add(Child(), {})
    assert [parent.level, a.level, b.level, other.level] == ["1", "1.1", "1.2", "2"]
    # the block's timeout beats the job's actions.NAME, which beats the device's
    assert a.timeout == 60 and parent.timeout == 60
    # no block timeout: job actions.NAME (45) beats device actions.NAME (40) beats job action (120)
    assert other.timeout == 45
    assert other.connection_timeout == 7  # connections.NAME beats the global connection timeout
    described = yaml.safe_load(yaml.safe_dump(job.pipeline.describe()))
    assert described[0]["pipeline"][1]["level"] == "1.2"


def test_retry_runs_children_again_then_gives_up() -> None:
    job = make_job()
    flaky = Child([InfrastructureError("power glitch"), None])
    parent = job.pipeline.add(Parent([flaky]), {"failure_retry": 2})
    job.pipeline.run(None, Deadline.after(10))
    assert flaky.calls == 2 and parent.results["retries"] == 1

    job = make_job()
    broken = Child([JobError("one"), JobError("two"), JobError("three")])
    job.pipeline.add(Parent([broken]), {"failure_retry": 2})
    with pytest.raises(JobError, match="two"):
        job.pipeline.run(None, Deadline.after(10))
    assert broken.calls == 2


def test_errors_map_to_health_and_the_finalize_always_runs(tmp_path) -> None:
    for error, health, error_type in [(None, "Complete", None),
                                      (JobError("bad url"), "Incomplete", "Job"),
                                      (InfrastructureError("pdu down"), "Incomplete", "Infrastructure"),
                                      (TestError("raised"), "Incomplete", "Test"),
                                      (ValueError("oops"), "Incomplete", "Bug")]:
        job = make_job()
        job.build()
        child = Child([error] if error else [])
        job.pipeline.actions.insert(0, child)
        child.job, child.level = job, "0"
        assert job.run() == health
        final = [r for r in job.results if r.is_job_result][0]
        assert final.result == ("pass" if health == "Complete" else "fail")
        assert final.extra.get("error_type") == error_type
        assert job.finalize.started  # finalize ran after the failure
        lava = {r.case: r for r in job.results if r.suite == "lava"}
        assert lava["power-off"].result == "pass"


def test_a_failing_action_result_names_the_error() -> None:
    job = make_job()
    job.pipeline.add(Child([JobTimeout("fake-child timed out")]), {})
    with pytest.raises(JobTimeout):
        job.pipeline.run(None, Deadline.after(10))
    lava = [r for r in job.results if r.case == "fake-child"][0]
    assert lava.result == "fail" and "timed out" in lava.extra["fail"]


def test_deferred_work_is_done_once_and_never_fails_the_job() -> None:
    job = make_job()
    done = []
    job.defer(lambda: done.append("first"))
    job.defer(lambda: 1 / 0)
    job.defer(lambda: done.append("after the failure"))
    job.while_booting()
    job.while_booting()
    assert done == ["first", "after the failure"]


def test_strategy_registry() -> None:
    with pytest.raises(JobError, match="unknown boot method 'foo'; known: .*qemu"):
        strategy("boot", "foo")
    with pytest.raises(Bug, match="registered twice"):
        register("boot", "qemu")(type("Again", (Action,), {}))


@pytest.mark.parametrize(("section", "method", "noun"), [
    ("deploy", "downloads", "deploy to"), ("deploy", "nfs", "deploy to"), ("boot", "grub", "boot method"),
    ("boot", "barebox", "boot method"), ("test", "monitors", "test kind"), ("test", "interactive", "test kind"),
])
def test_a_method_lava_has_and_pumice_does_not_is_not_implemented(section: str, method: str, noun: str) -> None:
    """So the side-by-side report counts it as a method to add, not as a disagreement with LAVA."""
    with pytest.raises(JobError, match=f"^not implemented: {noun} '{method}' \\(LAVA has it; Pumice implements: "):
        strategy(section, method)


def test_a_protocol_lava_has_is_not_implemented_and_any_other_is_unknown() -> None:
    text = JOB + "protocols:\n  lava-multinode: {}\n  lava-vland: {}\n  lava-frobnicate: {}\n"
    faults = {f.path: f.message for f in validate_job(text, DEVICE)}
    assert faults["protocols.lava-multinode"] == "not implemented: the lava-multinode protocol"
    assert faults["protocols.lava-vland"] == "not implemented: the lava-vland protocol"
    assert faults["protocols.lava-frobnicate"].startswith("unknown protocol; LAVA knows: lava-lxc, ")


def test_durations() -> None:
    assert parse_duration({"hours": 1, "seconds": 30}) == 3630
    assert format_duration(3630) == "01:00:30"
    with pytest.raises(JobError):
        parse_duration({"minutes": 0})
    deadline = Deadline.after(100, parent=Deadline.after(5))
    assert deadline.remaining() <= 5
    assert Pipeline(None).actions == []
