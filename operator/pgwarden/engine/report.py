"""The cycle report: what one evaluation saw and did, and its JSON form (a contract other tools parse).

`CycleReport.to_json()` is the object `pgwarden enforce` prints, one per line, and what the controller
copies into a policy's status; its keys are fixed by the CLI contract, so extra diagnostics (duration,
next deadline) stay attributes and never enter the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pgwarden.engine.autovacuum_plan import AutovacuumReport
from pgwarden.policy.api import SkipReason
from pgwarden.policy.model import EnforcementAction


@dataclass(frozen=True)
class ActionRecord:
    """A session signalled (or, in dry run, that would be)."""

    rule: str
    action: str
    pid: int
    user: str | None
    database: str | None
    application_name: str | None
    client_address: str | None
    state: str | None
    state_age_seconds: float | None
    done: bool
    blocked: tuple[int, ...] = ()
    """For a `blocking` rule: the sessions it was seen blocking, longest wait first."""
    longest_wait_seconds: float | None = None
    """For a `blocking` rule: how long the first of `blocked` had waited for its lock."""

    def to_json(self) -> dict[str, Any]:
        blocking = (
            {"blocked": list(self.blocked), "longestWaitSeconds": round(self.longest_wait_seconds or 0.0, 1)}
            if self.blocked
            else {}
        )
        return (
            blocking
            | {
                "rule": self.rule,
                "action": self.action,
                "pid": self.pid,
                "user": self.user,
                "database": self.database,
                "applicationName": self.application_name,
                "clientAddress": self.client_address,
                "state": self.state,
                "stateAgeSeconds": None if self.state_age_seconds is None else round(self.state_age_seconds, 1),
                "done": self.done,
            }
            | blocking
        )


@dataclass(frozen=True)
class SkipRecord:
    """A session a rule chose but the engine left alone, and why."""

    rule: str
    pid: int
    reason: SkipReason
    """A `SkipReason`."""

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "pid": self.pid, "reason": self.reason}


@dataclass
class CycleReport:
    """One cycle against one server."""

    policy: str
    target: str
    server_version: str
    enforcement_action: EnforcementAction
    backends: dict[str, int]
    client_states: dict[str, int]
    actions: list[ActionRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    missing_privileges: tuple[str, ...] = ()
    """Grants the engine's role lacks for this policy (`pg_read_all_stats`, `pg_signal_backend`, the
    autovacuum cap's), as GRANT names them; each is also explained in `errors` (not in JSON)."""
    autovacuum: AutovacuumReport | None = None
    """The autovacuum report, only when the policy configures autovacuum."""
    next_deadline: float | None = None
    """Seconds after `observed_at` when a session seen now crosses a rule's thresholds (not in JSON)."""
    observed_at: float = 0.0
    """`time.monotonic()` when the observation arrived: the reference point of `next_deadline`."""
    duration_seconds: float = 0.0

    @property
    def dry_run(self) -> bool:
        return self.enforcement_action is EnforcementAction.DRY_RUN

    def to_json(self) -> dict[str, Any]:
        """Exactly the CLI contract's object; `autovacuum` only when the policy configures it."""
        out: dict[str, Any] = {
            "policy": self.policy,
            "target": self.target,
            "serverVersion": self.server_version,
            "enforcementAction": self.enforcement_action.value,
            "backends": dict(self.backends),
            "clientStates": dict(self.client_states),
            "actions": [a.to_json() for a in self.actions],
            "skipped": [s.to_json() for s in self.skipped],
            "errors": list(self.errors),
        }
        if self.autovacuum is not None:
            out["autovacuum"] = self.autovacuum.to_json()
        return out


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def _counts(values: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def render_text(report: CycleReport) -> str:
    """The same content as the JSON, for a person at a terminal."""
    mode = "dry run" if report.dry_run else "enforce"
    lines = [
        f"policy {report.policy}  target {report.target}  PostgreSQL {report.server_version}  {mode}",
        f"  backends:      {_counts(report.backends)}",
        f"  client states: {_counts(report.client_states)}",
    ]
    if report.actions:
        verb = "would act" if report.dry_run else "actions"
        lines.append(f"  {verb} ({len(report.actions)}):")
        rows = [
            [
                a.rule,
                a.action,
                str(a.pid),
                a.user or "-",
                a.database or "-",
                a.application_name or "-",
                a.client_address or "local",
                a.state or "-",
                "-" if a.state_age_seconds is None else f"{a.state_age_seconds:.1f}s",
                "yes" if a.done else "no",
            ]
            for a in report.actions
        ]
        headers = ["RULE", "ACTION", "PID", "USER", "DATABASE", "APPLICATION", "CLIENT", "STATE", "STATE AGE", "DONE"]
        lines.extend("    " + line for line in _table(headers, rows))
    else:
        lines.append("  no actions")
    if report.skipped:
        lines.append(f"  skipped ({len(report.skipped)}):")
        rows = [[s.rule, str(s.pid), s.reason] for s in report.skipped]
        lines.extend("    " + line for line in _table(["RULE", "PID", "REASON"], rows))
    if report.autovacuum is not None:
        lines.append(f"  autovacuum: {report.autovacuum.to_json()}")
    for error in report.errors:
        lines.append(f"  error: {error}")
    return "\n".join(lines)
