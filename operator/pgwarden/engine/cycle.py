"""One evaluation of a policy against one server: observe, decide, act, report.

This is the unit the CLI loop, the sidecar and the kopf controller all schedule. The connection is the
caller's (see `pgwarden.engine.session` for one that reconnects); the only memory between calls is the
last observation's clock reading per connection, to notice a step of the server's clock.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import psycopg
import structlog

from pgwarden.engine import act as acting
from pgwarden.engine.autovacuum import enforce_autovacuum, hold_claims, other_claims, quote_ident
from pgwarden.engine.autovacuum_claims import (
    CLAIM_INTERVALS,
    CLAIM_MIN_SECONDS,
    CLAIMS,
    conflict_message,
    process_conflict_message,
    process_conflict_name,
)
from pgwarden.engine.autovacuum_plan import AutovacuumReport, WriteAhead
from pgwarden.engine.budget import ActionBudget
from pgwarden.engine.decide import CLOCK_JUMP_LIMIT, ClockMark, Plan, PlannedAction, clock_step, plan
from pgwarden.engine.errors import CycleInterrupted
from pgwarden.engine.observe import ObservationQuery, WakeSignal, compile_observation, observe
from pgwarden.engine.report import CycleReport
from pgwarden.engine.types import Observation
from pgwarden.engine.wake import SignalMemory, due_now
from pgwarden.policy.api import ConditionReason
from pgwarden.policy.model import Autovacuum, EnforcementAction, PolicySpec

log = structlog.get_logger("pgwarden.engine")
_STDLIB_LOG = logging.getLogger("pgwarden.engine")
"""The stdlib logger behind `log` (structlog's first processor filters by its level)."""


class _BoundOnUse:
    """`log.bind(**fields)`, made on the first call through it.

    Most cycles log nothing; binding looks the stdlib logger up again (under the logging module's lock),
    which was ~5 % of an idle evaluation's client CPU at 200 targets.
    """

    __slots__ = ("_bound", "_fields")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields
        self._bound: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._bound is None:
            self._bound = log.bind(**self._fields)
        return getattr(self._bound, name)


INSUFFICIENT_PRIVILEGES_PREFIX = f"{ConditionReason.INSUFFICIENT_PRIVILEGES}: "
"""Every `errors` entry about a missing grant starts with this; the typed list is
`CycleReport.missing_privileges`."""

# What a session policy cannot do without each predefined role (read from the observation, so free).
_SESSION_GRANTS = {
    "pg_read_all_stats": "other roles' sessions are invisible to it (counted as unknown) and never acted on",
    "pg_signal_backend": "other roles' sessions cannot be signalled (skipped as notPermitted)",
}


CLOCK_JUMP = "clockJump"
"""The `errors` entry of a cycle that acted on nothing because the server's clock stepped starts with this."""

# The last observation's clocks per connection: a new connection starts afresh, and the memory goes with
# the connection object. Policies sharing a connection share it (any observation is a reading).
_CLOCKS: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], ClockMark] = weakref.WeakKeyDictionary()


def _clock_jump(conn: psycopg.AsyncConnection[Any], observation: Observation) -> str | None:
    """The clockJump error if the server's clock stepped since the last cycle on `conn`, else None."""
    if observation.server_time is None:
        return None
    current = ClockMark(server=observation.server_time, local=observation.received_at)
    step = clock_step(_CLOCKS.get(conn), current)
    _CLOCKS[conn] = current
    if abs(step) <= CLOCK_JUMP_LIMIT:
        return None
    return (
        f"{CLOCK_JUMP}: the server's clock moved {step:+.1f}s against pgwarden's monotonic clock since the last "
        f"cycle (more than {CLOCK_JUMP_LIMIT:g}s), so every age is off by as much: acted on nothing this cycle"
    )


# Per connection: the sessions signalled lately (any policy), and each policy's last observation with the spec
# it was made for (the upcoming crossings a wake-up acts on without looking first; see engine/wake.py).
_SIGNALLED: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], SignalMemory] = weakref.WeakKeyDictionary()
_LOOKAHEAD: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], dict[str, tuple[PolicySpec, Observation]]] = (
    weakref.WeakKeyDictionary()
)


def _last_seen(conn: psycopg.AsyncConnection[Any], policy: str, spec: PolicySpec) -> Observation | None:
    """This policy's last observation on `conn`, if it was made for this very spec (a changed spec may select
    other sessions: its crossings are unknown until it observes once)."""
    last = _LOOKAHEAD.get(conn, {}).get(policy)
    return last[1] if last is not None and last[0] is spec else None


def _due_on_wake(
    last: Observation | None,
    spec: PolicySpec,
    policy: str,
    protected_pids: Collection[int],
    budget: ActionBudget | None,
    memory: SignalMemory,
    now: float,
) -> tuple[PlannedAction, ...]:
    """What to signal in the observing statement: the last observation's upcoming sessions due by now, decided
    like any cycle (rules, protections, the blast radius's window). Blocking rules are left to the plain path,
    whose signal re-checks the lock graph."""
    if last is None or budget is None:
        return ()
    carried = memory.without_recent(due_now(last, now), now)
    if not carried.sessions:
        return ()
    decision = plan(carried, spec, protected_pids, used=budget.used(policy, spec.interval.total_seconds(), now))
    return tuple(a for a in decision.actions if not a.blocking)


async def _observe_and_signal(
    conn: psycopg.AsyncConnection[Any],
    query: ObservationQuery,
    due: tuple[PlannedAction, ...],
    bound: Any,
    *,
    target: str,
) -> tuple[Observation, acting.ActOutcome]:
    """One round trip: signal `due` (guarded) and observe. If that statement fails, a signal may have gone
    out, so each is reported as of unknown outcome; a lost connection raises (with that report) from the
    caller, else a plain observation follows."""
    signals = [WakeSignal(a.session.pid, a.session.backend_start, a.session.state_change, a.action.value) for a in due]
    try:
        observation = await observe(conn, query, target=target, signals=signals)
    except psycopg.Error as exc:
        outcome = acting.unknown_outcome(due, str(exc).strip(), bound)
        if conn.broken or conn.closed:
            outcome.lost = f"connection to {target} lost while signalling: {str(exc).strip()}"
            raise _WakeLost(outcome) from None
        return await observe(conn, query, target=target), outcome
    return observation, acting.wake_outcome(due, observation.signal_results, bound)


def _remember(
    memory: SignalMemory,
    budget: ActionBudget | None,
    policy: str,
    planned: tuple[PlannedAction, ...],
    outcome: acting.ActOutcome,
) -> None:
    """Note the signals PostgreSQL accepted: in the memory (never again while they exit) and in the budget."""
    done = {a.pid for a in outcome.actions if a.done}
    now = time.monotonic()
    memory.remember([a.session for a in planned if a.session.pid in done], now)
    if budget is not None:
        budget.record(policy, len(done), now)


def _interrupted_report(
    seen: Observation | None,
    policy: str,
    target: str,
    mode: EnforcementAction,
    outcome: acting.ActOutcome,
    started: float,
) -> CycleReport:
    """The report of a cycle whose wake-up statement lost the connection: counts as last seen, the signals'
    outcome unknown."""
    return CycleReport(
        policy=policy,
        target=target,
        server_version=seen.server_version if seen is not None else "",
        enforcement_action=mode,
        backends=dict(seen.backends) if seen is not None else {},
        client_states=dict(seen.client_states) if seen is not None else {},
        skipped=list(outcome.skipped),
        errors=[*outcome.errors, outcome.lost or "connection lost"],
        duration_seconds=time.monotonic() - started,
    )


class _WakeLost(Exception):
    """The connection broke during the wake-up statement; carries what is known of its signals."""

    def __init__(self, outcome: acting.ActOutcome) -> None:
        super().__init__(outcome.lost)
        self.outcome = outcome


def session_privileges(observation: Observation, spec: PolicySpec) -> list[str]:
    """The predefined roles a policy with session rules or connection limits needs and the role lacks."""
    if observation.own_superuser or not (spec.sessions or spec.connection_limits):
        return []
    have = {"pg_read_all_stats": observation.may_read_all_stats, "pg_signal_backend": observation.may_signal_backend}
    return [grant for grant, ok in have.items() if not ok]


def _role(observation: Observation) -> str:
    return quote_ident(observation.own_roles[-1]) if observation.own_roles else "(unknown)"


def privilege_errors(role: str, sessions: list[str], autovacuum: list[str]) -> list[str]:
    """Stable messages for missing grants: the prefix, the role, what is missing, what it costs, the fix."""
    messages = [
        f"{INSUFFICIENT_PRIVILEGES_PREFIX}role {role} lacks {grant}: {_SESSION_GRANTS[grant]}; GRANT {grant} TO {role}"
        for grant in sessions
    ]
    if autovacuum:
        messages.append(
            f"{INSUFFICIENT_PRIVILEGES_PREFIX}role {role} lacks for the autovacuum cap: "
            + "; ".join(autovacuum)
            + f" (GRANT each TO {role})"
        )
    return messages


def _spend(
    budget: ActionBudget,
    policy: str,
    spec: PolicySpec,
    decision: Plan,
    outcome: acting.ActOutcome,
    observation: Observation,
) -> float | None:
    """Record the signals PostgreSQL accepted; the next deadline, earlier if the window held sessions back."""
    window = spec.interval.total_seconds()
    budget.record(policy, sum(1 for a in outcome.actions if a.done), time.monotonic())
    deadline = decision.next_deadline
    if decision.reserve:  # held back by the window: look again when its oldest action leaves it
        frees = budget.frees_at(policy, window, observation.received_at)
        if frees is not None:
            deadline = frees if deadline is None else min(deadline, frees)
    return deadline


async def _autovacuum(
    conn: psycopg.AsyncConnection[Any],
    spec: Autovacuum,
    *,
    dry_run: bool,
    target: str,
    before_write: WriteAhead | None = None,
    last_written: int | None = None,
) -> tuple[AutovacuumReport | None, list[str], list[str], str | None]:
    """The autovacuum report, its errors, the grants it lacks, and why the connection broke (if it did)."""
    try:
        result = await enforce_autovacuum(
            conn, spec, dry_run=dry_run, before_write=before_write, last_written=last_written
        )
    except psycopg.Error as exc:
        if conn.broken or conn.closed:
            return None, [], [], f"connection to {target} lost during autovacuum: {str(exc).strip()}"
        return None, [f"autovacuum: {str(exc).strip()}"], [], None
    errors = [e if e.startswith("autovacuum") else f"autovacuum: {e}" for e in result.errors]
    lost = None if result.lost is None else f"connection to {target} lost during autovacuum: {result.lost}"
    return result, errors, list(result.missing_privileges), lost


_COMPILED: OrderedDict[tuple[int, frozenset[int]], tuple[PolicySpec, ObservationQuery]] = OrderedDict()
_COMPILED_MAX = 256


def compiled_observation(spec: PolicySpec, protected_pids: Collection[int] = ()) -> ObservationQuery:
    """`compile_observation`, memoised per spec object: a loop re-runs the same spec every cycle.

    Keyed by identity (specs hold lists, so they are not hashable); the entry keeps the spec alive, so
    its id cannot be reused by another object while cached.
    """
    key = (id(spec), frozenset(protected_pids))
    entry = _COMPILED.get(key)
    if entry is not None and entry[0] is spec:
        _COMPILED.move_to_end(key)
        return entry[1]
    query = compile_observation(spec, protected_pids)
    _COMPILED[key] = (spec, query)
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return query


def _claim_cap(spec: PolicySpec, policy: str, target: str, *, dry_run: bool) -> AutovacuumReport | None:
    """Claim this policy's cap on `target` (see autovacuum_claims); a report of the conflict if another
    policy of this process claims a different value there, else None (go on)."""
    desired = spec.autovacuum.max_workers
    if desired is None or dry_run:
        CLAIMS.drop(target, policy)  # a dry run never writes: it conflicts with nobody
        return None
    others = CLAIMS.claim(target, policy, desired, spec.interval.total_seconds())
    if not others:
        return None
    message = conflict_message(policy, desired, others)
    log.warning("autovacuum cap conflict", policy=policy, target=target, others=others)
    return AutovacuumReport(desired=desired, conflicts_with=sorted(others), errors=[f"autovacuum: {message}"])


# Per connection: which policy claims which value through it, until when (the advisory locks it holds).
_CONN_CLAIMS: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], tuple[str, dict[str, tuple[int, float]]]] = (
    weakref.WeakKeyDictionary()
)


def _connection_claims(
    conn: psycopg.AsyncConnection[Any], target: str, policy: str, value: int | None, interval: float
) -> frozenset[int]:
    """Note `policy`'s claim through `conn` (None: none), drop lapsed ones; the values `conn` must hold."""
    now = time.monotonic()
    _, claims = _CONN_CLAIMS.setdefault(conn, (target, {}))
    if value is None:
        claims.pop(policy, None)
    else:
        claims[policy] = (value, now + max(CLAIM_MIN_SECONDS, CLAIM_INTERVALS * interval))
    for other, (_, expires) in list(claims.items()):
        if expires < now:
            del claims[other]
    return frozenset(v for v, _ in claims.values())


def _own_pids(target: str) -> frozenset[int]:
    """This process's backends on `target` that may hold claims: their claims are in CLAIMS already."""
    return frozenset(
        c.info.backend_pid for c, (t, _) in list(_CONN_CLAIMS.items()) if t == target and not (c.closed or c.broken)
    )


async def _claim_across_processes(
    conn: psycopg.AsyncConnection[Any], spec: PolicySpec, policy: str, target: str, *, dry_run: bool
) -> AutovacuumReport | None:
    """Publish this policy's claim on the server (or withdraw it); a conflict report if a session of another
    pgwarden process claims a different value there, else None (go on). Costs nothing for a policy without
    a cap on a connection whose claims did not change; one read of pg_locks per capped cycle."""
    desired = None if dry_run else spec.autovacuum.max_workers
    await hold_claims(conn, _connection_claims(conn, target, policy, desired, spec.interval.total_seconds()))
    if desired is None:
        return None
    others = {pid: v for pid, v in (await other_claims(conn, _own_pids(target))).items() if v != desired}
    if not others:
        return None
    log.warning("autovacuum cap conflict with another process", policy=policy, target=target, others=others)
    return AutovacuumReport(
        desired=desired,
        conflicts_with=[process_conflict_name(pid, v) for pid, v in sorted(others.items())],
        errors=[f"autovacuum: {process_conflict_message(policy, desired, others)}"],
    )


async def _claims_or_lost(
    conn: psycopg.AsyncConnection[Any], spec: PolicySpec, policy: str, target: str, *, dry_run: bool
) -> tuple[AutovacuumReport | None, str | None]:
    """`_claim_across_processes`, with a failure turned into a report that writes nothing, or a lost connection."""
    try:
        return await _claim_across_processes(conn, spec, policy, target, dry_run=dry_run), None
    except psycopg.Error as exc:
        if conn.broken or conn.closed:
            return None, f"connection to {target} lost while claiming the autovacuum cap: {str(exc).strip()}"
        # Not knowing the others' claims is no reason to write blindly: report it, write nothing.
        return AutovacuumReport(
            desired=spec.autovacuum.max_workers,
            errors=[f"autovacuum: cannot read other processes' claims: {str(exc).strip()}"],
        ), None


async def run_cycle(
    conn: psycopg.AsyncConnection[Any],
    spec: PolicySpec,
    *,
    policy: str,
    target: str,
    dry_run_override: bool = False,
    protected_pids: Collection[int] = (),
    budget: ActionBudget | None = None,
    before_write: WriteAhead | None = None,
) -> CycleReport:
    """Evaluate `spec` once on the server behind `conn` and return what was seen and done.

    `budget`: the caller's record of actions per policy on this target; with it the blast-radius limits
    bound any window of length `spec.interval`, not just this cycle (without it: this cycle only).
    `before_write`: see `WriteAhead` (the autovacuum cap records what it writes before writing it).

    Raises TargetUnreachable (connection failed or lost) or QueryFailed (the observation failed);
    per-session problems are reported in the result instead. A connection lost after acting began raises
    CycleInterrupted (a TargetUnreachable) carrying the report of everything done until then.
    """
    started = time.monotonic()
    dry_run = dry_run_override or spec.dry_run
    mode = EnforcementAction.DRY_RUN if dry_run else EnforcementAction.ENFORCE
    bound = _BoundOnUse(policy=policy, target=target)

    query = compiled_observation(spec, protected_pids)
    memory = _SIGNALLED.get(conn)
    if memory is None:
        memory = _SIGNALLED[conn] = SignalMemory()
    last = None if dry_run else _last_seen(conn, policy, spec)
    due = _due_on_wake(last, spec, policy, protected_pids, budget, memory, started)
    woke = acting.ActOutcome()
    if due:
        try:
            observation, woke = await _observe_and_signal(conn, query, due, bound, target=target)
        except _WakeLost as lost_wake:
            raise CycleInterrupted(
                lost_wake.outcome.lost or "connection lost",
                _interrupted_report(last, policy, target, mode, lost_wake.outcome, started),
            ) from None
        _remember(memory, budget, policy, due, woke)
    else:
        observation = await observe(conn, query, target=target)
    observation = memory.without_recent(observation, time.monotonic())
    jump = _clock_jump(conn, observation)
    if jump is not None:
        bound.warning("server clock stepped; acting on nothing this cycle", error=jump)
        decision = Plan(actions=(), skipped=(), next_deadline=None)  # the next cycle, at `interval`, acts
        _LOOKAHEAD.get(conn, {}).pop(policy, None)
    else:
        used = budget.used(policy, spec.interval.total_seconds(), started) if budget is not None else 0
        decision = plan(observation, spec, protected_pids, used=used)
        if not dry_run and observation.upcoming:
            _LOOKAHEAD.setdefault(conn, {})[policy] = (spec, observation)
        elif not dry_run:
            # Nothing upcoming: a wake-up would carry nothing forward (see _due_on_wake), so nothing is kept;
            # 20 policies x 200 pods kept ~1.2 KB each of observations no wake-up would read.
            _LOOKAHEAD.get(conn, {}).pop(policy, None)
    if dry_run:
        outcome = acting.dry_run(decision.actions, bound)
    else:
        outcome = (  # a quiet cycle (the common case) skips the call: nothing is sent either way
            await acting.act(conn, decision.actions, bound, target=target, reserve=decision.reserve)
            if decision.actions
            else acting.ActOutcome()
        )
        signalled = {a.pid for a in outcome.actions if a.done}
        memory.remember([a.session for a in decision.actions if a.session.pid in signalled], time.monotonic())
    # What the limits held back, less the sessions that took a refused signal's slot.
    held_back = [s for s in decision.skipped if s.pid not in outcome.from_reserve]
    next_deadline = decision.next_deadline
    if budget is not None and not dry_run:
        next_deadline = _spend(budget, policy, spec, decision, outcome, observation)

    report = CycleReport(
        policy=policy,
        target=target,
        server_version=observation.server_version,
        enforcement_action=mode,
        backends=observation.backends,
        client_states=observation.client_states,
        actions=[*woke.actions, *outcome.actions],
        skipped=[*woke.skipped, *held_back, *outcome.skipped],
        errors=[*woke.errors, *outcome.errors],
        next_deadline=next_deadline,
        observed_at=observation.received_at,
    )
    if jump is not None:
        report.errors.append(jump)
    sessions_missing = session_privileges(observation, spec)
    autovacuum_missing: list[str] = []
    lost = outcome.lost
    conflict = _claim_cap(spec, policy, target, dry_run=dry_run)
    if lost is None:  # published even in an in-process conflict: the other processes must see it too
        across, lost = await _claims_or_lost(conn, spec, policy, target, dry_run=dry_run)
        conflict = conflict or across
    if conflict is not None:
        report.autovacuum = conflict
        report.errors.extend(conflict.errors)
    elif spec.autovacuum.max_workers is not None and jump is None and lost is None:
        report.autovacuum, errors, autovacuum_missing, lost = await _autovacuum(
            conn,
            spec.autovacuum,
            dry_run=dry_run,
            target=target,
            before_write=before_write,
            last_written=CLAIMS.last_written(target, policy),
        )
        report.errors.extend(errors)
        if report.autovacuum is not None and report.autovacuum.written:
            CLAIMS.record_write(target, policy, spec.autovacuum.max_workers)
    # Missing grants first in `errors`: they explain the rest. Checked every cycle at no cost: the session
    # grants are columns of the observation, the autovacuum ones of the privileges it reads anyway.
    report.missing_privileges = tuple(sessions_missing + autovacuum_missing)
    if sessions_missing or autovacuum_missing:
        report.errors[:0] = privilege_errors(_role(observation), sessions_missing, autovacuum_missing)
    report.duration_seconds = time.monotonic() - started
    if lost is not None:
        # The cycle failed after it began to act: the report of what was done goes with the error.
        report.errors.append(lost)
        bound.error("cycle interrupted", error=lost, actions=len(report.actions))
        raise CycleInterrupted(lost, report)
    if _STDLIB_LOG.isEnabledFor(logging.DEBUG):  # what filter_by_level decides, without building the event
        bound.debug(
            "cycle done",
            dry_run=dry_run,
            actions=len(report.actions),
            skipped=len(report.skipped),
            errors=len(report.errors),
            next_deadline=report.next_deadline,
            duration_seconds=round(report.duration_seconds, 4),
        )
    return report
