"""The state machine of jobs, devices and workers: every legal transition and its consequences.

The service layer asks this module what may happen (``check_job_transition``), what a cancel does
(``cancel_target``) and what a finished job means for its device (``finish_outcome``); it never
decides those itself. Names and values follow LAVA's state machine, which lab engineers know.

Jobs: Submitted -> Scheduled -> Running -> Finished, with Canceling between a canceled running job
and the agent's confirmation (Scheduling is kept for multi-device jobs). Health: Unknown until the
job is Finished, then Complete, Incomplete or Canceled.

Devices: state Idle -> Reserved (a job is assigned) -> Running (the agent started it) -> Idle.
Health Good/Unknown/Looping/Bad/Maintenance/Retired is set by admins and by health checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import Fault
from master.errors import Conflict, Invalid


class JobState:
    SUBMITTED = "Submitted"
    SCHEDULING = "Scheduling"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    CANCELING = "Canceling"
    FINISHED = "Finished"
    ALL = (SUBMITTED, SCHEDULING, SCHEDULED, RUNNING, CANCELING, FINISHED)
    #: waiting for a device
    QUEUED = (SUBMITTED, SCHEDULING)
    #: holding a device
    ACTIVE = (SCHEDULED, RUNNING, CANCELING)


class JobHealth:
    UNKNOWN = "Unknown"
    COMPLETE = "Complete"
    INCOMPLETE = "Incomplete"
    CANCELED = "Canceled"
    ALL = (UNKNOWN, COMPLETE, INCOMPLETE, CANCELED)


class DeviceState:
    IDLE = "Idle"
    RESERVED = "Reserved"
    RUNNING = "Running"
    ALL = (IDLE, RESERVED, RUNNING)


class DeviceHealth:
    GOOD = "Good"
    UNKNOWN = "Unknown"
    LOOPING = "Looping"
    BAD = "Bad"
    MAINTENANCE = "Maintenance"
    RETIRED = "Retired"
    ALL = (GOOD, UNKNOWN, LOOPING, BAD, MAINTENANCE, RETIRED)
    #: a device in one of these may run a health check
    CHECKABLE = (GOOD, UNKNOWN, LOOPING)


class WorkerState:
    ONLINE = "Online"
    OFFLINE = "Offline"
    ALL = (ONLINE, OFFLINE)


class WorkerHealth:
    ACTIVE = "Active"
    MAINTENANCE = "Maintenance"
    RETIRED = "Retired"
    ALL = (ACTIVE, MAINTENANCE, RETIRED)


#: job priorities by name, as in LAVA job files (``priority: medium``); numbers 0-100 are allowed too
PRIORITIES = {"low": 0, "medium": 50, "high": 100}

#: a device type's health checks: every 24 hours unless its admin says otherwise (as in LAVA)
DEFAULT_HEALTH_FREQUENCY = 24
DEFAULT_HEALTH_DENOMINATOR = "hours"

#: seconds: the job timeout of a job that has none recorded (stored before release 6, or imported)
DEFAULT_JOB_TIMEOUT = 24 * 3600.0

#: error types (agent.errors ``error_type``) that are the lab's fault, not the job's: the device is suspect
INFRASTRUCTURE_ERRORS = ("Infrastructure", "Configuration", "Bug")

_JOB_TRANSITIONS: dict[str, tuple[str, ...]] = {
    JobState.SUBMITTED: (JobState.SCHEDULING, JobState.SCHEDULED, JobState.FINISHED),
    JobState.SCHEDULING: (JobState.SCHEDULED, JobState.FINISHED),
    JobState.SCHEDULED: (JobState.RUNNING, JobState.CANCELING, JobState.FINISHED),
    JobState.RUNNING: (JobState.CANCELING, JobState.FINISHED),
    JobState.CANCELING: (JobState.FINISHED,),
    JobState.FINISHED: (),
}


def sources_of(target: str) -> tuple[str, ...]:
    """Every job state from which ``target`` may be reached (the WHERE of a conditional UPDATE)."""
    return tuple(state for state, targets in _JOB_TRANSITIONS.items() if target in targets)


def check_job_transition(job_id: int, current: str, target: str) -> None:
    """Raise :class:`Conflict` unless a job may go from ``current`` to ``target``."""
    if target not in _JOB_TRANSITIONS[current]:
        allowed = ", ".join(_JOB_TRANSITIONS[current]) or "none (the job is finished)"
        raise Conflict(f"job {job_id} is {current}: it cannot become {target}; allowed: {allowed}")


def cancel_target(job_id: int, current: str) -> tuple[str, str]:
    """What canceling a job in ``current`` does: ``(state, health)``.

    A queued job is canceled at once (Finished/Canceled); one holding a device moves to Canceling
    until the agent confirms it stopped; canceling twice is harmless.
    """
    if current in JobState.QUEUED:
        return JobState.FINISHED, JobHealth.CANCELED
    if current in (JobState.SCHEDULED, JobState.RUNNING, JobState.CANCELING):
        return JobState.CANCELING, JobHealth.UNKNOWN
    raise Conflict(f"job {job_id} is already finished: it cannot be canceled")


@dataclass(frozen=True)
class FinishOutcome:
    """What a finished job leaves behind: its own health and its device's (None: unchanged)."""

    job_health: str
    device_health: str | None


def finish_outcome(job_state: str, reported: str, *, health_check: bool, device_health: str,
                   error_type: str | None = None) -> FinishOutcome:
    """The job's final health and the device's new health when the agent reports the end of a job.

    - A job that was Canceling ends Canceled whatever the agent says.
    - A health check sets the device's health: Complete -> Good, Incomplete -> Bad, Canceled ->
      Unknown (the check did not conclude); a Looping device stays Looping to run the next one.
    - An infrastructure error or a bug in an ordinary job puts a Good device to Unknown, so the
      scheduler runs its health check before the next job (an admin's Bad/Maintenance/Retired stays).
    """
    if reported not in (JobHealth.COMPLETE, JobHealth.INCOMPLETE, JobHealth.CANCELED):
        raise Conflict(f"a job cannot finish as {reported!r}; allowed: Complete, Incomplete, Canceled")
    job_health = JobHealth.CANCELED if job_state == JobState.CANCELING else reported
    new_device: str | None = None
    if health_check:
        if device_health == DeviceHealth.LOOPING:
            new_device = None
        elif device_health in (DeviceHealth.GOOD, DeviceHealth.UNKNOWN, DeviceHealth.BAD):
            new_device = {
                JobHealth.COMPLETE: DeviceHealth.GOOD,
                JobHealth.INCOMPLETE: DeviceHealth.BAD,
                JobHealth.CANCELED: DeviceHealth.UNKNOWN,
            }[job_health]
    elif error_type in INFRASTRUCTURE_ERRORS and device_health == DeviceHealth.GOOD:
        new_device = DeviceHealth.UNKNOWN
    if new_device == device_health:
        new_device = None
    return FinishOutcome(job_health, new_device)


def parse_priority(value: object) -> int:
    """A job's ``priority:`` as a number 0-100 (``low``=0, ``medium``=50, ``high``=100)."""
    if isinstance(value, bool):
        raise ValueError(f"priority must be low, medium, high or 0-100, not {value!r}")
    if isinstance(value, int) and 0 <= value <= 100:
        return value
    if isinstance(value, str) and value.lower() in PRIORITIES:
        return PRIORITIES[value.lower()]
    raise ValueError(f"priority must be low, medium, high or a number 0-100, not {value!r}")


#: the largest count an admin may set (job_limit, health_frequency) or a client ask for (offset):
#: LAVA keeps them in 32-bit integer columns
MAX_COUNT = 2**31 - 1


def given(value: Any, default: Any) -> Any:
    """``value``, or ``default`` when it was left out: None, or an empty form field. Every front
    door passes what it received; the defaults live once, in the service layer."""
    return default if value is None or value == "" else value


def parse_count(name: str, value: object, low: int = 0, high: int = MAX_COUNT) -> int:
    """``value`` (an integer, or its decimal text from a form or a command line) as an int from
    ``low`` to ``high``, else Invalid with a fault whose path is ``name``."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and len(value.strip()) <= 20:  # never int() of a huge text: 5000 digits raise
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None:
        shown = f"{value[:40]!r}" if isinstance(value, str) else type(value).__name__
        message = f"{name} must be a whole number from {low} to {high}, not {shown}"
    elif not low <= number <= high:
        shown = str(number) if number.bit_length() <= 64 else "a larger number"
        message = f"{name} must be from {low} to {high}, not {shown}"
    else:
        return number
    raise Invalid(message, [Fault(name, message)])


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` matched case-insensitively against ``allowed`` (the one spelling of a choice for
    every front door), or Invalid listing them."""
    for choice in allowed:
        if str(value).lower() == choice.lower():
            return choice
    raise Invalid(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
