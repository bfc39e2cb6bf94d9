"""Kubernetes Events for what a cycle did on one target: one Event per reason, never one per session."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_PIDS_IN_MESSAGE = 20


@dataclass(frozen=True)
class PolicyEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


def _sessions(count: int) -> str:
    return f"{count} session" if count == 1 else f"{count} sessions"


def _pids(pids: list[int]) -> str:
    shown = ", ".join(str(p) for p in pids[:MAX_PIDS_IN_MESSAGE])
    more = len(pids) - MAX_PIDS_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")


def events_for_cycle(pod: str, report: Mapping[str, Any]) -> list[PolicyEvent]:
    """Events summarising one cycle on one pod: who (pod, rule), what (count, pids), why (the rule)."""
    dry_run = report.get("enforcementAction") == "dryRun"
    grouped: dict[tuple[str, str], list[int]] = defaultdict(list)
    for action in report.get("actions") or []:
        if dry_run or action.get("done"):
            grouped[(str(action.get("action")), str(action.get("rule")))].append(int(action["pid"]))
    events: list[PolicyEvent] = []
    for (action, rule), pids in sorted(grouped.items()):
        if dry_run:
            verb = "would terminate" if action == "terminate" else "would cancel queries of"
            events.append(
                PolicyEvent(
                    "Normal", "DryRun", f"pod {pod}: rule {rule} {verb} {_sessions(len(pids))} (pids {_pids(pids)})"
                )
            )
        elif action == "terminate":
            events.append(
                PolicyEvent(
                    "Normal",
                    "SessionsTerminated",
                    f"pod {pod}: rule {rule} terminated {_sessions(len(pids))} (pids {_pids(pids)})",
                )
            )
        else:
            events.append(
                PolicyEvent(
                    "Normal",
                    "QueriesCancelled",
                    f"pod {pod}: rule {rule} cancelled the queries of {_sessions(len(pids))} (pids {_pids(pids)})",
                )
            )
    autovacuum = report.get("autovacuum") or {}
    max_workers = autovacuum.get("maxWorkers") or {}
    cancelled = list(autovacuum.get("cancelled") or [])
    if max_workers.get("written") or cancelled:
        parts = []
        if max_workers.get("written"):
            pending = " (pending a restart)" if max_workers.get("pendingRestart") else ""
            parts.append(f"set autovacuum_max_workers to {max_workers.get('desired')}{pending}")
        if cancelled:
            parts.append(f"stopped {len(cancelled)} excess autovacuum workers (pids {_pids(cancelled)})")
        reason = "DryRun" if dry_run else "AutovacuumCapped"
        prefix = "would " if dry_run else ""
        events.append(PolicyEvent("Normal", reason, f"pod {pod}: {prefix}" + " and ".join(parts)))
    return events
