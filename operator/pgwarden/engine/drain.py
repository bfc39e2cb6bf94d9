"""Draining one database: terminate every client session connected to it, round after round, until none is left.

`pgwarden drain` is built from the engine's own parts, so it is exactly as careful as `enforce`:
- each round reads the sessions with the one observation statement (`observe`), compiled from a spec that
  selects every session on the database (`drain_spec`: one terminate rule, `connectionAge: 0s`, the
  database's exact name), with the excluded users in `exclude`;
- the decision is `decide.plan`: pgwarden's own sessions in any process, non-client backends (every
  replication connection, autovacuum, background workers), excluded users and sessions the role may not
  signal are never candidates;
- each signal is `act.act`'s guarded statement (pid + backend_start + state_change), never a bare
  `pg_terminate_backend(pid)`.

What differs from `enforce`, on purpose: the blast-radius limits are opened wide (the point is to end
every session), and the evaluation repeats until the database holds no session drain may terminate or the
timeout passes. A session already signalled is not signalled again while it exits; a client that
reconnects is a new backend, found and terminated by the next round.

The database counts as drained when no session drain may terminate remains: sessions it must not touch
(pgwarden's own, excluded users, not permitted, non-client backends, invisible ones) are listed apart,
each with the reason, and never hold the drain up. That last word comes from one listing statement run
after the last round (`_REMAINING`), whose rows are classified with the same protection functions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from pgwarden.engine import act as acting
from pgwarden.engine.autovacuum import quote_ident
from pgwarden.engine.cycle import privilege_errors, session_privileges
from pgwarden.engine.decide import Plan, PlannedAction, is_own, is_protected, plan
from pgwarden.engine.errors import EngineError, QueryFailed, TargetUnreachable
from pgwarden.engine.observe import PERMITTED_EXPRESSION, ObservationQuery, compile_observation, observe
from pgwarden.engine.report import ActionRecord, SkipRecord
from pgwarden.engine.session import EVALUATION_TIMEOUT_SECONDS, sever_connection
from pgwarden.engine.types import CLIENT_BACKEND, Observation, ObservedSession
from pgwarden.policy import PolicySpec, parse_spec
from pgwarden.policy.api import SkipReason, Untouched
from pgwarden.policy.model import EnforcementAction, Exclude

DRAIN_RULE = "drain"
"""The rule name in drain's action and skip records (`rule` in the same records `enforce` prints)."""
BLAST_RADIUS_NOTE = (
    "drain ignores the blast-radius limits (maxActionsPerCycle, maxFractionPerCycle) on purpose: "
    "it terminates every session it may, in as many rounds as it takes"
)
ROUND_PAUSE_SECONDS = 0.1
"""Between two rounds: lets the terminated backends exit (and reconnecting clients show up) without a
busy loop of observations; short, so a drain of a quiet database takes about one pause."""
QUIET_SECONDS = 2.0
"""After drain terminated sessions, the database counts as drained once it stayed free of sessions drain may
terminate this long (a look at each end): a client that reconnects within it is terminated too (before the
deadline) or listed as a survivor (after it). A drain therefore ends at most this long after its timeout."""
STEP_BOUND_SECONDS = EVALUATION_TIMEOUT_SECONDS
"""The longest one step of a round (observe, signal, list) may take. Each statement has a statement_timeout,
but a server that stops answering (a stopped process, a network blackhole) honours none: past this bound the
connection is shut down under the waiting statement, and the drain ends with exit 3 and what it did."""
_NO_LIMIT = 1_000_000  # above any max_connections PostgreSQL accepts (262143): the limit never binds


class UnknownDatabase(EngineError):
    """The database to drain does not exist on the server: a usage error, nothing was touched."""


class DrainInterrupted(TargetUnreachable):
    """The connection broke during a round; the report of everything done until then travels with it."""

    def __init__(self, message: str, report: DrainReport) -> None:
        super().__init__(message)
        report.interrupted = True
        self.report = report


@dataclass(frozen=True)
class RemainingSession:
    """A backend still connected to the database at the end: a survivor (reason None) or left untouched."""

    pid: int
    backend_type: str | None
    user: str | None
    application_name: str | None
    client_address: str | None
    state: str | None
    reason: Untouched | None = None
    signalled: bool = False
    """A survivor drain already signalled that had not exited yet when the timeout passed."""

    def to_json(self, database: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": self.pid,
            "user": self.user,
            "database": database,
            "applicationName": self.application_name,
            "clientAddress": self.client_address,
            "state": self.state,
            "backendType": self.backend_type,
        }
        if self.reason is None:
            out["signalled"] = self.signalled
        else:
            out["reason"] = self.reason.value
        return out


@dataclass
class DrainReport:
    """What a drain saw and did; `to_json()` is the object `pgwarden drain --output json` prints."""

    database: str
    target: str
    dry_run: bool
    timeout_seconds: float
    server_version: str = ""
    drained: bool = False
    rounds: int = 0
    """Rounds that signalled (a dry run signals nothing: 0)."""
    actions: list[ActionRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    survivors: list[RemainingSession] = field(default_factory=list)
    untouched: list[RemainingSession] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0
    interrupted: bool = False
    """The connection broke or a statement failed during the drain: this report is what was done until then."""

    @property
    def timed_out(self) -> bool:
        return not self.dry_run and not self.drained and not self.interrupted

    def to_json(self) -> dict[str, Any]:
        mode = EnforcementAction.DRY_RUN if self.dry_run else EnforcementAction.ENFORCE
        return {
            "database": self.database,
            "target": self.target,
            "serverVersion": self.server_version,
            "enforcementAction": mode.value,
            "drained": self.drained,
            "timedOut": self.timed_out,
            "rounds": self.rounds,
            "timeoutSeconds": self.timeout_seconds,
            "actions": [a.to_json() for a in self.actions],
            "skipped": [s.to_json() for s in self.skipped],
            "survivors": [s.to_json(self.database) for s in self.survivors],
            "untouched": [s.to_json(self.database) for s in self.untouched],
            "errors": list(self.errors),
            "notes": [BLAST_RADIUS_NOTE],
        }


# -- the spec and the listing ------------------------------------------------------------------------


def literal_glob(name: str) -> str:
    """A glob that matches exactly `name`: `*`, `?` and `[` become one-character sets.

    Drain names one database, never a pattern: `--database 'shop*'` must not drain `shop_archive`.
    """
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def drain_spec(database: str, exclude_users: Sequence[str] = ()) -> PolicySpec:
    """The policy drain evaluates: every client session on `database`, whatever its age or state.

    `exclude_users` are fnmatch globs, as `exclude.users` in a policy.
    """
    return parse_spec(
        {
            "limits": {"maxActionsPerCycle": _NO_LIMIT, "maxFractionPerCycle": 1.0},
            "exclude": {"users": list(exclude_users)},
            "sessions": [
                {
                    "name": DRAIN_RULE,
                    "action": "terminate",
                    "databases": [literal_glob(database)],
                    "connectionAge": "0s",
                }
            ],
        }
    )


_T = TypeVar("_T")
_Key = tuple[int, datetime]
"""A backend's identity: its pid alone could be reused by a new backend."""

_DATABASE_OID = "SELECT oid FROM pg_catalog.pg_database WHERE datname = %(name)s"

# Every backend connected to the database except this connection, with what the protections need; the
# permission test is the observation's own expression (one definition of what PostgreSQL would refuse).
_REMAINING = sql.SQL(
    """SELECT pid, backend_type, backend_start, state_change, state, application_name, host(client_addr),
       (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = usesysid),
       {permitted}
FROM pg_catalog.pg_stat_get_activity(NULL)
WHERE datid = %(datid)s::oid AND pid <> pg_catalog.pg_backend_pid()
ORDER BY pid"""
).format(permitted=sql.SQL(PERMITTED_EXPRESSION))


def classify(session: ObservedSession, exclude: Exclude, own_roles: Sequence[str]) -> Untouched | None:
    """Why drain must leave a visible backend alone, or None: it may terminate it."""
    if session.backend_type != CLIENT_BACKEND:
        return Untouched.NOT_CLIENT_BACKEND
    if is_own(session, own_roles):
        return Untouched.OWN
    if is_protected(session, exclude, ()):
        return Untouched.EXCLUDED
    if not session.permitted:
        return Untouched.NOT_PERMITTED
    return None


def _remaining_row(row: Sequence[Any], ctx: _Drain) -> RemainingSession:
    """A listing row, classified; a backend whose signal PostgreSQL refused counts as not permitted."""
    pid, backend_type, backend_start, state_change, state, application, address, user, permitted = row
    base = RemainingSession(pid, backend_type, user, application, address, state)
    if backend_type is None or backend_start is None:  # hidden without pg_read_all_stats
        return replace(base, reason=Untouched.NOT_VISIBLE)
    session = ObservedSession(
        pid=pid,
        user=user,
        database=ctx.report.database,
        application_name=application,
        client_address=address,
        state=state,
        backend_start=backend_start,
        state_change=state_change,
        state_age=None,
        query_age=None,
        transaction_age=None,
        connection_age=None,
        backend_type=backend_type,
        permitted=bool(permitted) and (pid, backend_start) not in ctx.refused,
    )
    reason = classify(session, ctx.spec.exclude, ctx.own_roles)
    return replace(base, reason=reason, signalled=(pid, backend_start) in ctx.signalled)


# -- the rounds ------------------------------------------------------------------------------------------


def _key(planned: PlannedAction) -> _Key:
    return planned.session.pid, planned.session.backend_start


@dataclass
class _Drain:
    """One drain in progress: the connection, what was decided, and what was signalled so far."""

    conn: psycopg.AsyncConnection[Any]
    spec: PolicySpec
    query: ObservationQuery
    datid: int
    report: DrainReport
    log: Any
    signalled: dict[_Key, ActionRecord] = field(default_factory=dict)
    refused: set[_Key] = field(default_factory=set)
    """Backends whose signal PostgreSQL refused (permissionDenied): never tried again."""
    seen_skips: set[tuple[int, str]] = field(default_factory=set)
    grants_checked: bool = False
    own_roles: tuple[str, ...] = ()

    async def bounded(self, step: Awaitable[_T]) -> _T:
        """Await one step of a round within STEP_BOUND_SECONDS (see there)."""
        cut = False

        def cut_off() -> None:
            nonlocal cut
            cut = True
            sever_connection(self.conn)

        handle = asyncio.get_running_loop().call_later(STEP_BOUND_SECONDS, cut_off)
        try:
            return await step
        except EngineError:
            if not cut:
                raise
            raise TargetUnreachable(
                f"{self.report.target} did not answer within {STEP_BOUND_SECONDS:g} s; connection closed"
            ) from None
        finally:
            handle.cancel()

    async def look(self) -> tuple[Observation, Plan]:
        observation = await self.bounded(observe(self.conn, self.query, target=self.report.target))
        self.report.server_version = observation.server_version
        self.own_roles = observation.own_roles
        if not self.grants_checked:  # the grants cannot change the answer between rounds: say it once
            self.grants_checked = True
            missing = session_privileges(observation, self.spec)
            role = quote_ident(observation.own_roles[-1]) if observation.own_roles else "(unknown)"
            self.report.errors.extend(privilege_errors(role, missing, []))
        decision = plan(observation, self.spec)
        self.skip(decision.skipped)
        return observation, decision

    def skip(self, records: Sequence[SkipRecord]) -> None:
        """Report each (session, reason) once, however many rounds met it."""
        for record in records:
            if (record.pid, record.reason) not in self.seen_skips:
                self.seen_skips.add((record.pid, record.reason))
                self.report.skipped.append(record)

    async def signal(self, fresh: Sequence[PlannedAction]) -> None:
        outcome = await self.bounded(acting.act(self.conn, fresh, self.log, target=self.report.target))
        self.report.rounds += 1
        self.skip(outcome.skipped)
        self.report.errors.extend(e for e in outcome.errors if e not in self.report.errors)  # once, not per round
        done = {a.pid for a in outcome.actions if a.done}
        refused = {s.pid for s in outcome.skipped if s.reason == SkipReason.PERMISSION_DENIED}
        for planned in fresh:
            if planned.session.pid in refused:
                self.refused.add(_key(planned))
            if planned.session.pid in done:
                record = acting.record(planned, done=True)
                self.signalled[_key(planned)] = record
                self.report.actions.append(record)
        if outcome.lost is not None:
            self.report.errors.append(outcome.lost)
            raise DrainInterrupted(outcome.lost, self.report)

    async def remaining(self) -> list[RemainingSession]:
        rows = await self.bounded(self._list())
        return [_remaining_row(row, self) for row in rows]

    async def _list(self) -> list[tuple[Any, ...]]:
        try:
            cur = await self.conn.execute(_REMAINING, {"datid": self.datid})
            return await cur.fetchall()
        except psycopg.Error as exc:
            raise _failure(self.conn, f"listing the sessions on {self.report.database}", exc) from None

    def finish(self, remaining: Sequence[RemainingSession], *, drained: bool) -> DrainReport:
        self.report.drained = drained
        self.report.survivors = [s for s in remaining if s.reason is None] if not self.report.dry_run else []
        self.report.untouched = [s for s in remaining if s.reason is not None]
        return self.report


def _failure(conn: psycopg.AsyncConnection[Any], doing: str, exc: psycopg.Error) -> EngineError:
    message = f"{doing}: {str(exc).strip()}"
    return TargetUnreachable(message) if conn.broken or conn.closed else QueryFailed(message)


async def _database_oid(conn: psycopg.AsyncConnection[Any], database: str) -> int:
    try:
        cur = await conn.execute(_DATABASE_OID, {"name": database})
        row = await cur.fetchone()
    except psycopg.Error as exc:
        raise _failure(conn, "reading pg_database", exc) from None
    if row is None:
        raise UnknownDatabase(f"database {quote_ident(database)} does not exist; nothing was touched")
    return int(row[0])


async def drain(
    conn: psycopg.AsyncConnection[Any],
    database: str,
    *,
    target: str,
    log: Any,
    within: float,
    exclude_users: Sequence[str] = (),
    dry_run: bool = False,
    pause: float = ROUND_PAUSE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> DrainReport:
    """Terminate every session on `database` drain may terminate, in rounds, until none remains or
    `within` seconds pass (one round always signals); see the module docstring.

    A dry run observes once and lists what a drain would terminate, signalling nothing. Raises
    UnknownDatabase, TargetUnreachable / QueryFailed (nothing or part done: DrainInterrupted carries the
    report of what was signalled before the connection broke).
    """
    started = clock()
    deadline = started + within
    spec = drain_spec(database, exclude_users)
    state = _Drain(
        conn=conn,
        spec=spec,
        query=compile_observation(spec),
        datid=0,
        report=DrainReport(database=database, target=target, dry_run=dry_run, timeout_seconds=within),
        log=log,
    )
    state.datid = await state.bounded(_database_oid(conn, database))
    try:
        return await _rounds(state, deadline=deadline, pause=pause, clock=clock)
    except DrainInterrupted:
        raise
    except EngineError as exc:
        if not state.report.actions:
            raise
        # A later round failed: what the earlier ones terminated is reported with the error, never lost.
        state.report.errors.append(str(exc))
        raise DrainInterrupted(str(exc), state.report) from None
    finally:
        state.report.duration_seconds = clock() - started


def _terminable(remaining: Sequence[RemainingSession]) -> bool:
    return any(s.reason is None for s in remaining)


async def _rounds(state: _Drain, *, deadline: float, pause: float, clock: Callable[[], float]) -> DrainReport:
    report = state.report
    quiet_since: float | None = None
    while True:
        _, decision = await state.look()
        fresh = [p for p in decision.actions if _key(p) not in state.signalled and _key(p) not in state.refused]
        pending = sum(1 for p in decision.actions if _key(p) in state.signalled)  # exiting: never signalled twice
        if report.dry_run:
            report.actions = acting.dry_run(fresh, state.log).actions
            remaining = await state.remaining()
            return state.finish(remaining, drained=not fresh and not _terminable(remaining))
        now = clock()
        if not fresh and not pending:
            # The observation found nothing; the listing has the last word (a client may have connected
            # since), and it lists what drain leaves alone.
            remaining = await state.remaining()
            if not _terminable(remaining):
                # After terminating, the database must stay empty for QUIET_SECONDS (two looks): a client
                # that reconnects at once is caught by the second look, not declared gone. The deadline ends
                # the signalling, not this wait: the verdict may come up to QUIET_SECONDS after it.
                settled = quiet_since is not None and now - quiet_since >= QUIET_SECONDS
                if not state.signalled or settled:
                    return state.finish(remaining, drained=True)
                quiet_since = now if quiet_since is None else quiet_since
                await asyncio.sleep(max(0.0, QUIET_SECONDS - (now - quiet_since)))
                continue
        quiet_since = None
        # Past the deadline; but a first round with sessions to terminate always signals (--timeout 0s).
        if now >= deadline and not (report.rounds == 0 and fresh):
            remaining = await state.remaining()
            return state.finish(remaining, drained=not _terminable(remaining))
        if fresh:
            await state.signal(fresh)
        await asyncio.sleep(max(0.0, min(pause, deadline - clock())))
