"""Blocker-aware rules (issue 15): a session is terminated (or its query cancelled) for blocking others.

Real locks on a real server: a row lock held by an idle transaction with writers queued behind it, the same
with nobody waiting, a chain A -> B -> C, an advisory lock, and an active blocker whose query is cancelled.
The server's own log (the ledger) says who was signalled.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from pgwarden.policy import PolicySpec
from tests.fixtures.postgres import PgFactory
from tests.harness.engine import enforce, spec_of, unique
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer, wait_for

pytestmark = pytest.mark.pg


@pytest.fixture
def server(pg_factory: PgFactory) -> PgServer:
    server = pg_factory(ledger=True)
    server.execute("CREATE TABLE IF NOT EXISTS rows (id int PRIMARY KEY, v int)")
    server.execute("INSERT INTO rows VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING")
    return server


class Waiter:
    """A session that runs one statement in a thread and waits (on a lock) until it completes or fails."""

    def __init__(self, server: PgServer, statement: str, app: str, *, in_transaction: str | None = None) -> None:
        self.conn = psycopg.connect(server.dsn(application_name=app), autocommit=True)
        self.pid = self.conn.info.backend_pid
        self.error: Exception | None = None
        self.done = threading.Event()
        if in_transaction is not None:  # first take a lock of its own, in an open transaction
            self.conn.execute("BEGIN")
            self.conn.execute(in_transaction)
        self._thread = threading.Thread(target=self._run, args=(statement,), daemon=True)
        self._thread.start()
        wait_for(lambda: _waiting(server, self.pid), message=f"session {self.pid} to wait for a lock")

    def _run(self, statement: str) -> None:
        try:
            self.conn.execute(statement)
        except Exception as exc:  # the test reads it
            self.error = exc
        finally:
            self.done.set()

    def close(self) -> None:
        self.conn.cancel_safe(timeout=5)
        self._thread.join(timeout=10)
        self.conn.close()


def _waiting(server: PgServer, pid: int) -> bool:
    return bool(server.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (pid,)))


def holder(server: PgServer, app: str, statement: str) -> Any:
    """An idle transaction that ran `statement` (taking its locks) and sits there."""
    session = server.open_session("idle in transaction", application_name=app)
    session.conn.execute(statement)
    return session


def blockers_rule(app: str, action: str = "terminate", states: list[str] | None = None, **blocking: Any) -> PolicySpec:
    rule: dict[str, Any] = {
        "name": "blockers",
        "action": action,
        "applicationNames": [app],
        "blocking": {"minBlocked": 1, "minWait": "0s", **blocking},
    }
    if states is not None:
        rule["states"] = states
    return spec_of(sessions=[rule])


async def test_an_idle_transaction_holding_a_row_lock_with_writers_queued_is_terminated(
    server: PgServer, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    ledger = Ledger(server.logfile)
    blocker = holder(server, app, "UPDATE rows SET v = v + 1 WHERE id = 1")
    writers = [Waiter(server, "UPDATE rows SET v = v + 1 WHERE id = 1", f"{app}-writer") for _ in range(3)]
    try:
        report = await enforce(server, blockers_rule(app, states=["idle in transaction"], minBlocked=3))
        assert [a.pid for a in report.actions] == [blocker.pid]
        (action,) = report.actions
        assert sorted(action.blocked) == sorted(w.pid for w in writers)
        assert action.to_json()["longestWaitSeconds"] >= 0
        ledger.assert_agrees([blocker.pid])
        for writer in writers:  # the queue drains: each writer's UPDATE completes
            assert writer.done.wait(10)
            assert writer.error is None
    finally:
        for writer in writers:
            writer.close()


async def test_a_lock_holder_nobody_waits_for_is_left_alone(server: PgServer, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    ledger = Ledger(server.logfile)
    blocker = holder(server, app, "UPDATE rows SET v = v + 1 WHERE id = 2")
    report = await enforce(server, blockers_rule(app, states=["idle in transaction"]))
    assert report.actions == []
    assert server.alive(blocker.pid)
    assert ledger.engine_signals() == []


async def test_too_few_waiters_or_too_short_a_wait_is_not_enough(
    server: PgServer, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    blocker = holder(server, app, "UPDATE rows SET v = v + 1 WHERE id = 1")
    writer = Waiter(server, "UPDATE rows SET v = v + 1 WHERE id = 1", f"{app}-writer")
    try:
        assert (await enforce(server, blockers_rule(app, minBlocked=2))).actions == []
        report = await enforce(server, blockers_rule(app, minWait="1h"))
        assert report.actions == []
        assert report.next_deadline is not None  # the wait's crossing time is known: a deadline, not a poll
        assert 3500 < report.next_deadline <= 3600
        assert server.alive(blocker.pid)
    finally:
        writer.close()


async def test_in_a_chain_only_the_root_blocker_is_terminated(server: PgServer, request: pytest.FixtureRequest) -> None:
    """A holds row 1; B holds row 2 and waits for row 1; C waits for row 2. B blocks C but is itself waiting:
    ending B would free nothing while A stays, so only A matches (documented: root blockers only)."""
    app = unique(request)
    ledger = Ledger(server.logfile)
    a = holder(server, app, "UPDATE rows SET v = v + 1 WHERE id = 1")
    b = Waiter(
        server, "UPDATE rows SET v = v + 1 WHERE id = 1", app, in_transaction="UPDATE rows SET v = 0 WHERE id = 2"
    )
    c = Waiter(server, "UPDATE rows SET v = v + 1 WHERE id = 2", app)
    try:
        report = await enforce(server, blockers_rule(app))
        assert [x.pid for x in report.actions] == [a.pid]
        ledger.assert_agrees([a.pid])
        assert b.done.wait(10)  # A gone: B gets row 1
        assert server.alive(b.pid)
        assert server.alive(c.pid)  # C still waits on B's open transaction
    finally:
        b.close()
        c.close()


async def test_an_advisory_lock_holder_is_a_blocker_too(server: PgServer, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    key = abs(hash(app)) % 1_000_000
    a = server.open_session("idle", application_name=app)
    a.conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    b = Waiter(server, f"SELECT pg_advisory_lock({key})", f"{app}-waiter")
    try:
        report = await enforce(server, blockers_rule(app, states=["idle"]))
        assert [x.pid for x in report.actions] == [a.pid]
        assert b.done.wait(10)
        assert b.error is None
    finally:
        b.close()


async def test_cancel_on_an_active_blocker_cancels_its_query_and_keeps_the_session(
    server: PgServer, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    ledger = Ledger(server.logfile)
    a = psycopg.connect(server.dsn(application_name=app), autocommit=True)
    # One implicit transaction: the lock is held while pg_sleep runs, released when the query is cancelled.
    a.pgconn.send_query(b"LOCK TABLE rows IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60)")
    wait_for(lambda: server.state_of(a.info.backend_pid) == "active", message="the blocker to be active")
    b = Waiter(server, "SELECT count(*) FROM rows", f"{app}-reader")
    try:
        report = await enforce(server, blockers_rule(app, action="cancel", states=["active"]))
        assert [x.pid for x in report.actions] == [a.info.backend_pid]
        ledger.assert_agrees([a.info.backend_pid], action="cancel")
        assert b.done.wait(10)
        assert b.error is None
        assert server.alive(a.info.backend_pid)  # the session stays
    finally:
        b.close()
        a.cancel_safe(timeout=5)
        a.close()
