"""Signalling the planned sessions, one guarded statement each, so only the observed backend is hit.

Between observation and action a backend may end, its pid may be reused by a new backend, or the
session may change state (an idle session that just started a query no longer matches an idle rule).
Each signal is therefore sent from a statement that re-reads `pg_stat_activity` and only signals the
backend with the observed pid, `backend_start` and `state_change`; anything else is skipped and
reported, never an error. A refused signal (SQLSTATE 42501, e.g. a non-superuser engine and a superuser
backend) is reported for that session and the cycle goes on, and its slot in the blast radius goes to the
next session the limits held back (the reserve), so a refusal never eats the budget; only a broken
connection stops it, and what was signalled until then is returned with the reason (`ActOutcome.lost`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString

import psycopg

from pgwarden.engine.decide import PlannedAction
from pgwarden.engine.report import ActionRecord, SkipRecord
from pgwarden.policy.api import SkipReason
from pgwarden.policy.model import SessionAction

# pg_stat_get_activity(pid) is the function behind the pg_stat_activity view, asked for one backend: the same
# data, without building a row for every other backend (on a server with 5,000 sessions, 1 ms instead of 15).
_GUARD: LiteralString = (
    " FROM pg_catalog.pg_stat_get_activity(%(pid)s) AS a"
    " WHERE a.backend_type = 'client backend'"
    " AND a.backend_start = %(backend_start)s"
    " AND a.state_change IS NOT DISTINCT FROM %(state_change)s"
)
# Fixed statements, one per action: the function name is chosen here, never from user input.
_SIGNAL: dict[SessionAction, LiteralString] = {
    SessionAction.TERMINATE: "SELECT pg_catalog.pg_terminate_backend(a.pid)" + _GUARD,
    SessionAction.CANCEL: "SELECT pg_catalog.pg_cancel_backend(a.pid)" + _GUARD,
}
# A blocker chosen by a `blocking` rule is signalled only while it still blocks one of the sessions observed
# waiting for it (it may have committed, or the waiters given up, since the observation).
_STILL_BLOCKING: LiteralString = (
    " AND EXISTS (SELECT 1 FROM unnest(%(blocked)s::int[]) AS w(pid)"
    " WHERE a.pid = ANY(pg_catalog.pg_blocking_pids(w.pid)))"
)
_SIGNAL_BLOCKER: dict[SessionAction, LiteralString] = {
    action: statement + _STILL_BLOCKING for action, statement in _SIGNAL.items()
}
_STILL_A_BLOCKER: LiteralString = (
    "SELECT EXISTS (SELECT 1 FROM unnest(%(blocked)s::int[]) AS w(pid)"
    " WHERE %(pid)s = ANY(pg_catalog.pg_blocking_pids(w.pid)))"
)
_WHY_NOT: LiteralString = (
    "SELECT a.backend_start = %(backend_start)s FROM pg_catalog.pg_stat_get_activity(%(pid)s) AS a"
)


@dataclass
class ActOutcome:
    """What acting did: sessions signalled, sessions left alone (with the reason), per-session errors."""

    actions: list[ActionRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    from_reserve: set[int] = field(default_factory=set)
    """Pids of reserve sessions that took a refused signal's slot (no longer held back by the limits)."""
    lost: str | None = None
    """Why acting stopped early: the connection broke. What was signalled before is in `actions`."""


def record(planned: PlannedAction, *, done: bool) -> ActionRecord:
    """The report's view of a planned action; `done` only once the signal was delivered."""
    s = planned.session
    return ActionRecord(
        rule=planned.rule,
        action=planned.action.value,
        pid=s.pid,
        user=s.user,
        database=s.database,
        application_name=s.application_name,
        client_address=s.client_address,
        state=s.state,
        state_age_seconds=s.state_age,
        done=done,
        blocked=s.blocked if planned.blocking else (),
        longest_wait_seconds=(s.blocked_waits[0] if s.blocked_waits else None) if planned.blocking else None,
    )


def _log_fields(planned: PlannedAction, *, dry_run: bool) -> dict[str, Any]:
    s = planned.session
    return {
        "rule": planned.rule,
        "action": planned.action.value,
        "pid": s.pid,
        "user": s.user,
        "database": s.database,
        "application": s.application_name,
        "client_address": s.client_address,
        "state": s.state,
        "state_age_seconds": None if s.state_age is None else round(s.state_age, 3),
        "dry_run": dry_run,
    } | ({"blocked": list(s.blocked)} if planned.blocking else {})


def dry_run(planned: Sequence[PlannedAction], log: Any) -> ActOutcome:
    """Report what enforce would do; no statement is sent."""
    outcome = ActOutcome()
    for p in planned:
        log.info(f"would {p.action.value} session", **_log_fields(p, dry_run=True))
        outcome.actions.append(record(p, done=False))
    return outcome


async def _why_not(conn: psycopg.AsyncConnection[Any], planned: PlannedAction) -> SkipReason:
    s = planned.session
    cur = await conn.execute(_WHY_NOT, {"pid": s.pid, "backend_start": s.backend_start})
    row = await cur.fetchone()
    if row is None or not row[0]:
        return SkipReason.GONE
    if planned.blocking:
        cur = await conn.execute(_STILL_A_BLOCKER, {"pid": s.pid, "blocked": list(s.blocked)})
        still = await cur.fetchone()
        if still is not None and not still[0]:
            return SkipReason.NO_LONGER_BLOCKING
    return SkipReason.STATE_CHANGED


async def signal_one(conn: psycopg.AsyncConnection[Any], planned: PlannedAction) -> bool | SkipReason:
    """Signal one session; True if signalled, else the skip reason. Raises psycopg errors."""
    s = planned.session
    params: dict[str, Any] = {"pid": s.pid, "backend_start": s.backend_start, "state_change": s.state_change}
    if planned.blocking:
        params["blocked"] = list(s.blocked)
        cur = await conn.execute(_SIGNAL_BLOCKER[planned.action], params)
    else:
        cur = await conn.execute(_SIGNAL[planned.action], params)
    row = await cur.fetchone()
    if row is None:
        return await _why_not(conn, planned)
    # False: the process was gone by the time the signal was sent (PostgreSQL also logs a WARNING).
    return True if row[0] else SkipReason.GONE


async def act(
    conn: psycopg.AsyncConnection[Any],
    planned: Sequence[PlannedAction],
    log: Any,
    *,
    target: str = "",
    reserve: Sequence[PlannedAction] = (),
) -> ActOutcome:
    """Signal each planned session in order; see the module docstring for what is skipped and why.

    A refused signal takes the next session from `reserve`: at most one statement more per refusal, so a
    cycle sends at most len(planned) + len(reserve) signals.
    """
    outcome = ActOutcome()
    queue = list(planned)
    spare = list(reserve)
    while queue:
        p = queue.pop(0)
        fields = _log_fields(p, dry_run=False)
        try:
            result = await signal_one(conn, p)
        except psycopg.errors.InsufficientPrivilege as exc:
            detail = exc.diag.message_primary or str(exc).strip()
            message = f"{p.action.value} pid {p.session.pid} (rule {p.rule}): permission denied: {detail}"
            outcome.skipped.append(SkipRecord(p.rule, p.session.pid, SkipReason.PERMISSION_DENIED))
            outcome.errors.append(message)
            log.warning("signal refused", reason=SkipReason.PERMISSION_DENIED, error=message, **fields)
            if spare:  # a refusal does not count against the limits: the next held-back session gets the slot
                promoted = spare.pop(0)
                outcome.from_reserve.add(promoted.session.pid)
                queue.append(promoted)
            continue
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                # Stop here, keeping what was done: the caller reports it before it handles the failure.
                where = f" to {target}" if target else ""
                outcome.lost = f"connection{where} lost while signalling: {str(exc).strip()}"
                outcome.skipped.append(SkipRecord(p.rule, p.session.pid, SkipReason.FAILED))
                outcome.errors.append(
                    f"{p.action.value} pid {p.session.pid} (rule {p.rule}): the connection broke during the "
                    "signal, so whether PostgreSQL delivered it is unknown"
                )
                log.error("connection lost while signalling", error=outcome.lost, **fields)
                return outcome
            message = f"{p.action.value} pid {p.session.pid} (rule {p.rule}): {str(exc).strip()}"
            outcome.skipped.append(SkipRecord(p.rule, p.session.pid, SkipReason.FAILED))
            outcome.errors.append(message)
            log.warning("signal failed", reason=SkipReason.FAILED, error=message, **fields)
            continue
        if isinstance(result, SkipReason):
            outcome.skipped.append(SkipRecord(p.rule, p.session.pid, result))
            log.info("session left alone", reason=result, **fields)
        else:
            outcome.actions.append(record(p, done=True))
            log.info(f"session {'terminated' if p.action is SessionAction.TERMINATE else 'cancelled'}", **fields)
    return outcome


_WAKE_SKIPS = {
    "gone": SkipReason.GONE,
    "stateChanged": SkipReason.STATE_CHANGED,
    "notPermitted": SkipReason.NOT_PERMITTED,
}


def wake_outcome(planned: Sequence[PlannedAction], results: Sequence[str], log: Any) -> ActOutcome:
    """What the wake-up statement did to each planned session (`results` in the same order), logged as
    `act` logs each signal."""
    outcome = ActOutcome()
    for p, result in zip(planned, results, strict=True):
        fields = _log_fields(p, dry_run=False)
        if result == "done":
            outcome.actions.append(record(p, done=True))
            log.info(f"session {'terminated' if p.action is SessionAction.TERMINATE else 'cancelled'}", **fields)
            continue
        reason = _WAKE_SKIPS.get(result, SkipReason.FAILED)
        outcome.skipped.append(SkipRecord(p.rule, p.session.pid, reason))
        log.info("session left alone", reason=reason, **fields)
    return outcome


def unknown_outcome(planned: Sequence[PlannedAction], error: str, log: Any) -> ActOutcome:
    """The wake-up statement failed: a signal may have gone out before the failure, so each planned one is
    reported as failed with that said (the server's log has the answer), never as not sent."""
    outcome = ActOutcome()
    for p in planned:
        outcome.skipped.append(SkipRecord(p.rule, p.session.pid, SkipReason.FAILED))
        outcome.errors.append(
            f"{p.action.value} pid {p.session.pid} (rule {p.rule}): the statement that signals and observes "
            f"failed, so whether PostgreSQL delivered the signal is unknown: {error}"
        )
        log.error("signal outcome unknown", error=error, **_log_fields(p, dry_run=False))
    return outcome
