"""Kubernetes Events for what a cycle did on one target: one Event per reason, never one per session."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pgwarden.engine.autovacuum_plan import AutovacuumReport
from pgwarden.engine.report import CycleReport
from pgwarden.policy.api import EventReason, EventType
from pgwarden.policy.model import SessionAction
from pgwarden.settings import DEFAULTS


@dataclass(frozen=True)
class PolicyEvent:
    type: EventType
    reason: EventReason
    message: str


def _sessions(count: int) -> str:
    return f"{count} session" if count == 1 else f"{count} sessions"


def _pids(pids: list[int], cap: int) -> str:
    shown = ", ".join(str(p) for p in pids[:cap])
    more = len(pids) - cap
    return shown + (f" and {more} more" if more > 0 else "")


def events_for_cycle(pod: str, report: CycleReport, *, max_pids: int = DEFAULTS.event_max_pids) -> list[PolicyEvent]:
    """Events summarising one cycle on one pod: who (pod, rule), what (count, pids), why (the rule)."""
    grouped: dict[tuple[str, str], list[int]] = defaultdict(list)
    blocked: dict[tuple[str, str], tuple[set[int], float]] = {}
    for action in report.actions:
        if report.dry_run or action.done:
            key = (action.action, action.rule)
            grouped[key].append(action.pid)
            if action.blocked:
                pids, longest = blocked.get(key, (set(), 0.0))
                blocked[key] = (pids | set(action.blocked), max(longest, action.longest_wait_seconds or 0.0))
    events = [
        _session_event(pod, action, rule, pids, report.dry_run, max_pids, blocked.get((action, rule)))
        for (action, rule), pids in sorted(grouped.items())
    ]
    if report.autovacuum is not None:
        events.extend(_autovacuum_events(pod, report.autovacuum, max_pids))
    return events


def _session_event(
    pod: str,
    action: str,
    rule: str,
    pids: list[int],
    dry_run: bool,
    cap: int,
    blocked: tuple[set[int], float] | None = None,
) -> PolicyEvent:
    sessions = f"{_sessions(len(pids))} (pids {_pids(pids, cap)})"
    if blocked is not None:  # why a blocker was chosen: who it held up, and for how long at most
        sessions += f" that blocked {_sessions(len(blocked[0]))} for {blocked[1]:.0f}s"
    if dry_run:
        verb = "would terminate" if action == SessionAction.TERMINATE else "would cancel queries of"
        return PolicyEvent("Normal", EventReason.DRY_RUN, f"pod {pod}: rule {rule} {verb} {sessions}")
    if action == SessionAction.TERMINATE:
        return PolicyEvent("Normal", EventReason.SESSIONS_TERMINATED, f"pod {pod}: rule {rule} terminated {sessions}")
    return PolicyEvent(
        "Normal", EventReason.QUERIES_CANCELLED, f"pod {pod}: rule {rule} cancelled the queries of {sessions}"
    )


def _autovacuum_events(pod: str, autovacuum: AutovacuumReport, cap: int) -> list[PolicyEvent]:
    """What the cap wrote and stopped, or in a dry run what it would have (`would_write`, `would_cancel`)."""
    parts = []
    if autovacuum.dry_run:
        if autovacuum.would_write:
            parts.append(f"would set autovacuum_max_workers to {autovacuum.desired}")
        if autovacuum.would_cancel:
            stopped = autovacuum.would_cancel
            parts.append(f"would stop {len(stopped)} excess autovacuum workers (pids {_pids(stopped, cap)})")
        reason = EventReason.DRY_RUN
    else:
        if autovacuum.written:
            pending = " (pending a restart)" if autovacuum.pending_restart else ""
            parts.append(f"set autovacuum_max_workers to {autovacuum.desired}{pending}")
        if autovacuum.cancelled:
            stopped = autovacuum.cancelled
            parts.append(f"stopped {len(stopped)} excess autovacuum workers (pids {_pids(stopped, cap)})")
        reason = EventReason.AUTOVACUUM_CAPPED
    if not parts:
        return []
    return [PolicyEvent("Normal", reason, f"pod {pod}: " + " and ".join(parts))]
