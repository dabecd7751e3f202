"""The job state machine of QAPI's job.json: statuses, verbs, and which is allowed when.

The tables mirror QEMU's (job.c): :data:`TRANSITIONS` says which status may
follow which, :data:`VERBS` in which statuses a user command may act.
"""

from __future__ import annotations

import enum

from qmpd.errors import GenericError


class JobStatus(enum.Enum):
    """QAPI's JobStatus."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(enum.Enum):
    """QAPI's JobVerb: what a user command asks of a job."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _LIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _LIVE,
    JobVerb.RESUME: _LIVE,
    JobVerb.SET_SPEED: _LIVE,
    JobVerb.COMPLETE: frozenset({S.READY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
}

#: job_is_completed: the job's own work is over.
COMPLETED = frozenset({S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL})


class InvalidTransition(AssertionError):
    """A move the transition table forbids: a bug in qmpd, never a user error."""


def check_transition(old: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"job status {old.value} -> {new.value}")


def check_verb(job_id: str, status: JobStatus, verb: JobVerb) -> None:
    """job_apply_verb: refuse a verb the job's status does not allow, with QEMU's text."""
    if status not in VERBS[verb]:
        raise GenericError(f"Job '{job_id}' in state '{status.value}' cannot accept"
                           f" command verb '{verb.value}'")
