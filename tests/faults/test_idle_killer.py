"""An external idle killer never fails a cycle: pgwarden's own sessions opt out of the idle timeouts, and
a connection lost between cycles is replaced silently before the cycle runs.
"""

from __future__ import annotations

import itertools

import pytest
from psycopg import conninfo

from pgwarden.engine.connection import parse_dsn
from pgwarden.engine.session import TargetSession
from tests.fixtures.postgres import PgFactory
from tests.harness.engine import spec_of
from tests.harness.faults import Stopwatch, report_figures
from tests.harness.postgres import PgServer, wait_for

_octets = itertools.count(10)


def next_host() -> str:
    return f"127.0.{next(_octets)}.44"


def test_idle_timeouts_are_switched_off_in_the_startup_options() -> None:
    dsn = parse_dsn("host=db.example user=guard")
    options = str(conninfo.conninfo_to_dict(dsn.conninfo)["options"])
    assert "-c idle_session_timeout=0" in options
    assert "-c idle_in_transaction_session_timeout=0" in options
    assert dsn.conninfo_before_14 is not None
    assert "idle_session_timeout" not in str(conninfo.conninfo_to_dict(dsn.conninfo_before_14)["options"])


async def backend_pid(session: TargetSession) -> int:
    return (await session.connection()).info.backend_pid


@pytest.mark.pg
async def test_server_idle_session_timeout_shorter_than_the_interval_fails_no_cycle(pg_factory: PgFactory) -> None:
    server = pg_factory(host=next_host(), settings={"idle_session_timeout": "'1s'"})
    session = TargetSession(parse_dsn(server.dsn()))
    spec = spec_of()
    failures = 0
    try:
        await session.run(spec, policy="idle-killer")
        ours = await backend_pid(session)
        for _ in range(2):
            # The killer is real: an ordinary idle session is gone after a second. Ours idled as long.
            bystander = server.open_session("idle")
            server.wait_gone(bystander.pid, timeout=10)
            try:
                await session.run(spec, policy="idle-killer")
            except Exception:
                failures += 1
                raise
        assert await backend_pid(session) == ours  # not even a reconnect: the timeout never applied to us
    finally:
        await session.close()
    report_figures("external idle killer", "server idle_session_timeout=1s, cycles 1 s+ apart")
    assert failures == 0


@pytest.mark.pg
async def test_connection_killed_between_cycles_is_replaced_silently(pg: PgServer) -> None:
    session = TargetSession(parse_dsn(pg.dsn()))
    spec = spec_of()
    try:
        await session.run(spec, policy="killed-between")
        killed = await backend_pid(session)
        clock = Stopwatch()
        pg.execute("SELECT pg_terminate_backend(%s)", (killed,))
        wait_for(lambda: not pg.alive(killed), message="pgwarden's backend to exit")
        report = await session.run(spec, policy="killed-between")  # no exception: the one cycle succeeds
        recovered = clock()
        assert report.target
        assert await backend_pid(session) != killed
    finally:
        await session.close()
    report_figures("connection lost between cycles", "pg_terminate_backend on pgwarden's backend", recover_s=recovered)
