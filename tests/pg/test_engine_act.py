"""Acting on what was observed: sessions that vanish or change in between, refused signals, lost connections.

These tests drive the seams of a cycle (observe, plan, then act) so something can happen in between.
"""

from __future__ import annotations

import dataclasses
import os
import resource
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import structlog

from pgwarden.engine.act import act
from pgwarden.engine.connection import connect, parse_dsn
from pgwarden.engine.decide import PlannedAction, plan
from pgwarden.engine.observe import compile_observation, observe
from pgwarden.engine.session import TargetSession
from pgwarden.policy import PolicySpec
from pgwarden.policy.api import SkipReason
from tests.harness.engine import acted, enforce, spec_of, unique
from tests.harness.postgres import PgServer

pytestmark = pytest.mark.pg
log = structlog.get_logger("test")


@pytest.fixture
async def engine(pg: PgServer) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await connect(parse_dsn(pg.dsn()))
    yield conn
    await conn.close()


async def _planned(conn: psycopg.AsyncConnection[Any], spec: PolicySpec) -> list[PlannedAction]:
    observation = await observe(conn, compile_observation(spec))
    return list(plan(observation, spec).actions)


def _idle_rule(app: str) -> PolicySpec:
    return spec_of(
        sessions=[
            {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "0s", "applicationNames": [app]}
        ]
    )


async def test_session_that_ended_before_the_signal_is_skipped_not_an_error(
    pg: PgServer, engine: psycopg.AsyncConnection[Any], request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    leaving = pg.open_session("idle", application_name=app)
    staying = pg.open_session("idle", application_name=app)
    planned = await _planned(engine, _idle_rule(app))
    assert {p.session.pid for p in planned} == {leaving.pid, staying.pid}
    leaving.close()
    pg.wait_gone(leaving.pid)
    outcome = await act(engine, planned, log)
    assert [(s.pid, s.reason) for s in outcome.skipped] == [(leaving.pid, SkipReason.GONE)]
    assert [a.pid for a in outcome.actions] == [staying.pid]
    assert outcome.errors == []
    pg.wait_gone(staying.pid)


async def test_session_that_changed_state_since_observation_is_left_alone(
    pg: PgServer, engine: psycopg.AsyncConnection[Any], request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    session = pg.open_session("idle", application_name=app)
    planned = await _planned(engine, _idle_rule(app))
    session.conn.execute("SELECT 1")  # busy in between: idle again, but a new idle period (state_change moved)
    outcome = await act(engine, planned, log)
    assert [(s.pid, s.reason) for s in outcome.skipped] == [(session.pid, SkipReason.STATE_CHANGED)]
    assert outcome.actions == []
    assert outcome.errors == []
    assert pg.alive(session.pid)


async def test_reused_pid_is_never_signalled(
    pg: PgServer, engine: psycopg.AsyncConnection[Any], request: pytest.FixtureRequest
) -> None:
    """A backend with the observed pid but another backend_start is another session."""
    app = unique(request)
    session = pg.open_session("idle", application_name=app)
    [planned] = await _planned(engine, _idle_rule(app))
    earlier = planned.session.backend_start.replace(microsecond=(planned.session.backend_start.microsecond + 1) % 10**6)
    impostor = dataclasses.replace(planned, session=dataclasses.replace(planned.session, backend_start=earlier))
    outcome = await act(engine, [impostor], log)
    assert [(s.pid, s.reason) for s in outcome.skipped] == [(session.pid, SkipReason.GONE)]
    assert pg.alive(session.pid)


async def test_superuser_session_is_not_permitted_and_the_cycle_goes_on(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    """A non-superuser engine may not signal a superuser backend: never tried, reported as notPermitted (not an
    error), and others still handled. (A refusal at signal time: tests/pg/test_engine_trust.py.)"""
    app, engine_role, app_role = unique(request), unique(request, "engine"), unique(request, "app")
    pg.create_role(engine_role, grants=("pg_read_all_stats", "pg_signal_backend"))
    pg.create_role(app_role)
    superuser_session = pg.open_session("idle", application_name=app)
    app_session = pg.open_session("idle", user=app_role, application_name=app)
    spec = spec_of(sessions=[{"name": "all", "action": "terminate", "connectionAge": "0s", "applicationNames": [app]}])
    report = await enforce(pg, spec, user=engine_role)
    assert acted(report) == {app_session.pid}
    assert [(s.pid, s.reason) for s in report.skipped] == [(superuser_session.pid, SkipReason.NOT_PERMITTED)]
    assert report.errors == []
    pg.wait_gone(app_session.pid)
    assert pg.alive(superuser_session.pid)


async def test_engine_without_pg_read_all_stats_sees_only_what_it_may(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    """Without pg_read_all_stats other roles' sessions hide even their backend_type: counted, never acted on."""
    app, engine_role = unique(request), unique(request, "weak")
    pg.create_role(engine_role)
    hidden = pg.open_session("idle", application_name=app)
    spec = spec_of(sessions=[{"name": "all", "action": "terminate", "connectionAge": "0s", "applicationNames": [app]}])
    report = await enforce(pg, spec, user=engine_role)
    assert report.actions == []
    assert report.missing_privileges == ("pg_read_all_stats", "pg_signal_backend")  # and says so
    assert [e.split(":")[0] for e in report.errors] == ["InsufficientPrivileges"] * 2
    assert report.backends.get("unknown", 0) >= 1
    assert pg.alive(hidden.pid)


async def test_engine_connection_lost_between_cycles_is_replaced_before_the_next(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    """Killed while idle (an external idle killer, a restart): the next cycle runs on a new connection."""
    app = unique(request)
    target = TargetSession(parse_dsn(pg.dsn(), application_name=app))
    spec = spec_of(sessions=[{"name": "idle", "action": "terminate", "stateAge": "1h", "applicationNames": [app]}])
    try:
        first = await target.run(spec, policy="test")
        assert first.errors == []
        engine_pid = (await target.connection()).info.backend_pid
        pg.execute("SELECT pg_terminate_backend(%s)", (engine_pid,))
        pg.wait_gone(engine_pid)
        second = await target.run(spec, policy="test")  # a fresh connection, and no failed cycle (issue 12)
        assert second.errors == []
        assert (await target.connection()).info.backend_pid != engine_pid
        assert second.server_version == first.server_version
    finally:
        await target.close()


async def test_engine_connection_on_a_descriptor_past_1023_is_kept_between_cycles(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    """An operator with a thousand targets holds descriptors past select()'s FD_SETSIZE: the check for a
    connection dropped while idle must not take those for dropped (it did, reconnecting every cycle)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
    fillers: list[int] = []
    app = unique(request)
    target = TargetSession(parse_dsn(pg.dsn(), application_name=app))
    spec = spec_of(sessions=[{"name": "idle", "action": "terminate", "stateAge": "1h", "applicationNames": [app]}])
    try:
        while not fillers or fillers[-1] < 1024:  # the lowest free descriptors taken: the socket gets a high one
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        conn = await target.connection()
        assert conn.pgconn.socket >= 1024
        engine_pid = conn.info.backend_pid
        for _ in range(3):
            report = await target.run(spec, policy="test")
            assert report.errors == []
        assert (await target.connection()).info.backend_pid == engine_pid
        rows = pg.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))
        assert [r[0] for r in rows] == [engine_pid]  # one backend all along: never reopened
    finally:
        await target.close()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
