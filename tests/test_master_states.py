"""The job/device state machine (pure)."""

from __future__ import annotations

import pytest

from master.errors import Conflict
from master.states import (
    DeviceHealth,
    JobHealth,
    JobState,
    cancel_target,
    check_job_transition,
    finish_outcome,
    parse_priority,
    sources_of,
)


def test_legal_and_illegal_job_transitions() -> None:
    check_job_transition(1, JobState.SUBMITTED, JobState.SCHEDULED)
    check_job_transition(1, JobState.SCHEDULED, JobState.RUNNING)
    check_job_transition(1, JobState.RUNNING, JobState.CANCELING)
    check_job_transition(1, JobState.CANCELING, JobState.FINISHED)
    with pytest.raises(Conflict, match="job 7 is Finished: it cannot become Running"):
        check_job_transition(7, JobState.FINISHED, JobState.RUNNING)
    with pytest.raises(Conflict, match="allowed: Scheduling, Scheduled, Finished"):
        check_job_transition(7, JobState.SUBMITTED, JobState.RUNNING)
    assert set(sources_of(JobState.SCHEDULED)) == {JobState.SUBMITTED, JobState.SCHEDULING}


def test_cancel_queued_at_once_running_waits_for_agent() -> None:
    assert cancel_target(1, JobState.SUBMITTED) == (JobState.FINISHED, JobHealth.CANCELED)
    assert cancel_target(1, JobState.RUNNING) == (JobState.CANCELING, JobHealth.UNKNOWN)
    assert cancel_target(1, JobState.SCHEDULED) == (JobState.CANCELING, JobHealth.UNKNOWN)
    assert cancel_target(1, JobState.CANCELING) == (JobState.CANCELING, JobHealth.UNKNOWN)
    with pytest.raises(Conflict, match="already finished"):
        cancel_target(1, JobState.FINISHED)


@pytest.mark.parametrize(
    ("reported", "device_before", "device_after"),
    [
        ("Complete", DeviceHealth.UNKNOWN, DeviceHealth.GOOD),
        ("Incomplete", DeviceHealth.GOOD, DeviceHealth.BAD),
        ("Canceled", DeviceHealth.GOOD, DeviceHealth.UNKNOWN),
        ("Complete", DeviceHealth.LOOPING, None),
        ("Incomplete", DeviceHealth.LOOPING, None),
        ("Complete", DeviceHealth.MAINTENANCE, None),
    ],
)
def test_health_check_outcome_sets_device_health(
    reported: str, device_before: str, device_after: str | None
) -> None:
    outcome = finish_outcome(JobState.RUNNING, reported, health_check=True, device_health=device_before)
    assert outcome.job_health == reported
    assert outcome.device_health == device_after


def test_infrastructure_error_makes_device_unknown() -> None:
    outcome = finish_outcome(
        JobState.RUNNING,
        "Incomplete",
        health_check=False,
        device_health=DeviceHealth.GOOD,
        error_type="Infrastructure",
    )
    assert outcome == type(outcome)(JobHealth.INCOMPLETE, DeviceHealth.UNKNOWN)
    # a job error is the job's fault: the device stays Good
    assert (
        finish_outcome(
            JobState.RUNNING,
            "Incomplete",
            health_check=False,
            device_health=DeviceHealth.GOOD,
            error_type="Job",
        ).device_health
        is None
    )
    # an admin's decision stays
    assert (
        finish_outcome(
            JobState.RUNNING,
            "Incomplete",
            health_check=False,
            device_health=DeviceHealth.BAD,
            error_type="Bug",
        ).device_health
        is None
    )


def test_canceling_job_ends_canceled() -> None:
    outcome = finish_outcome(JobState.CANCELING, "Incomplete", health_check=False, device_health="Good")
    assert outcome.job_health == JobHealth.CANCELED
    with pytest.raises(Conflict, match="cannot finish as 'Weird'"):
        finish_outcome(JobState.RUNNING, "Weird", health_check=False, device_health="Good")


def test_priorities() -> None:
    assert [parse_priority(p) for p in ("low", "medium", "high", "HIGH", 0, 42, 100)] == [
        0,
        50,
        100,
        100,
        0,
        42,
        100,
    ]
    for bad in (101, -1, "urgent", True, 1.5):
        with pytest.raises(ValueError, match="low, medium, high"):
            parse_priority(bad)
