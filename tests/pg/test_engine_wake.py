"""Wake-ups at known crossings on a real server: one statement signals the sessions due and observes again.

The server's log is the judge: which statement signalled, whom, how often, and never before the crossing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.harness.engine import looping, spec_of, unique
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer, wait_for

pytestmark = pytest.mark.pg

WAKE_MARK = "signals AS MATERIALIZED"
THRESHOLD = 2.0


def idle_rule(app: str, *, action: str = "terminate", state: str = "idle") -> dict[str, Any]:
    return {"name": "r", "action": action, "states": [state], "stateAge": f"{THRESHOLD:g}s", "applicationNames": [app]}


async def until(condition: Callable[[], bool], message: str) -> None:
    await asyncio.to_thread(wait_for, condition, timeout=15.0, message=message)


def state_change(pg: PgServer, pid: int) -> datetime:
    ((changed,),) = pg.execute("SELECT state_change AT TIME ZONE 'UTC' FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert isinstance(changed, datetime)
    return changed


def log_time_utc(pg: PgServer) -> timedelta:
    """What to add to the log's local timestamps to get UTC (the server logs in its log_timezone)."""
    ((offset,),) = pg.execute(
        "SELECT extract(epoch FROM now() AT TIME ZONE current_setting('log_timezone') - now() AT TIME ZONE 'UTC')"
    )
    return -timedelta(seconds=float(offset))


async def test_a_crossing_is_signalled_by_the_statement_that_observes_and_never_early(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    session = pg.open_session("idle", application_name=app)
    changed = state_change(pg, session.pid)
    async with looping(pg, spec_of(interval="30s", sessions=[idle_rule(app)])) as reports:
        await until(lambda: session.pid in ledger.terminated(), "the session to be terminated")
    assert [a.pid for r in reports for a in r.actions] == [session.pid]
    ledger.assert_agrees([session.pid])
    (sent,) = [s for s in ledger.engine_signals() if s.pid == session.pid]
    statement = next(e for e in ledger.entries() if e.pid == sent.by_pid and e.at == sent.at and WAKE_MARK in e.message)
    assert "pg_stat_get_activity(NULL)" in statement.message  # the same statement observed again
    (effect,) = [e for e in ledger.effects() if e.pid == session.pid]
    assert effect.at + log_time_utc(pg) >= changed + timedelta(seconds=THRESHOLD)


async def test_sessions_crossing_together_are_signalled_once_each(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    # The statement that signals them still sees them (one snapshot), and a dying backend may linger a moment:
    # none may be signalled twice.
    app = unique(request)
    sessions = [pg.open_session("idle", application_name=app) for _ in range(20)]
    pids = sorted(s.pid for s in sessions)
    async with looping(pg, spec_of(interval="30s", sessions=[idle_rule(app)])) as reports:
        await until(lambda: set(pids) <= set(ledger.terminated()), "every session to be terminated")
        await until(lambda: all(not pg.alive(p) for p in pids), "every backend to exit")
    assert sorted(a.pid for r in reports for a in r.actions) == pids
    ledger.assert_agrees(pids)
    aimed = sorted(s.pid for s in ledger.engine_signals() if s.pid in pids)
    assert aimed == pids  # one statement aimed at each, never two


async def test_a_session_that_moves_before_its_crossing_is_left_alone_until_its_new_one(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    session = pg.open_session("idle", application_name=app)
    async with looping(pg, spec_of(interval="30s", sessions=[idle_rule(app)])) as reports:
        await asyncio.sleep(THRESHOLD * 0.7)  # the scenario: a query shortly before the crossing the loop knows
        await asyncio.to_thread(session.conn.execute, "SELECT 1")
        moved = state_change(pg, session.pid)
        await until(lambda: session.pid in ledger.terminated(), "the session to be terminated at its new crossing")
    ledger.assert_agrees([session.pid])
    (effect,) = [e for e in ledger.effects() if e.pid == session.pid]
    assert effect.at + log_time_utc(pg) >= moved + timedelta(seconds=THRESHOLD)
    assert [a.pid for r in reports for a in r.actions] == [session.pid]


async def test_a_long_query_is_cancelled_once_and_the_session_stays(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    session = pg.open_session("active", application_name=app)
    rule = idle_rule(app, action="cancel", state="active")
    async with looping(pg, spec_of(interval="30s", sessions=[rule])) as reports:
        await until(lambda: session.pid in ledger.cancelled(), "the query to be cancelled")
        await until(lambda: pg.state_of(session.pid) != "active", "the session to leave the active state")
    assert [a.pid for r in reports for a in r.actions] == [session.pid]
    ledger.assert_agrees([session.pid], action="cancel")
    assert [s.pid for s in ledger.engine_signals() if s.pid == session.pid] == [session.pid]
    assert pg.alive(session.pid)
