"""Engine reports built from the engine's own types, for tests of what consumes them (status, Events, metrics).

A hand-written dict can say what the engine never says (that seam hid a dry-run autovacuum Event that was
never posted), so consumers' tests get their input from these constructors instead.
"""

from __future__ import annotations

from pgwarden.engine.autovacuum_plan import AutovacuumReport
from pgwarden.engine.cycle import _SESSION_GRANTS, privilege_errors
from pgwarden.engine.report import ActionRecord, CycleReport, SkipRecord
from pgwarden.policy.model import EnforcementAction, SessionAction


def action(
    pid: int,
    *,
    rule: str = "idle",
    kind: SessionAction = SessionAction.TERMINATE,
    user: str | None = "app",
    done: bool = True,
) -> ActionRecord:
    """A session a rule acted on (or, with `done=False`, would have: a dry run, or a lost race)."""
    return ActionRecord(rule, kind.value, pid, user, None, None, None, "idle", 12.5, done)


def cycle_report(
    *actions: ActionRecord,
    dry_run: bool = False,
    autovacuum: AutovacuumReport | None = None,
    skipped: tuple[SkipRecord, ...] = (),
    backends: dict[str, int] | None = None,
    next_deadline: float | None = None,
    missing_privileges: tuple[str, ...] = (),
) -> CycleReport:
    """One cycle's report as `run_cycle` builds it (missing grants: typed list and `errors`, as the engine)."""
    return CycleReport(
        policy="ns/p",
        target="127.0.0.2:5432",
        server_version="18.6",
        enforcement_action=EnforcementAction.DRY_RUN if dry_run else EnforcementAction.ENFORCE,
        backends=dict(backends if backends is not None else {"client backend": 3, "checkpointer": 1}),
        client_states={"idle": 3},
        actions=list(actions),
        skipped=list(skipped),
        autovacuum=autovacuum,
        next_deadline=next_deadline,
        errors=privilege_errors('"warden"', [g for g in missing_privileges if g in _SESSION_GRANTS], []),
        missing_privileges=missing_privileges,
    )
