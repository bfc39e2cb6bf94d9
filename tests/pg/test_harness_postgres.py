"""The harness itself: each selected PostgreSQL major starts, accepts connections, shows its processes."""

from __future__ import annotations

import pytest

from tests.harness.postgres import PgServer

pytestmark = pytest.mark.pg


def test_server_reports_its_major_and_background_processes(pg: PgServer) -> None:
    assert pg.version_num // 10000 == int(pg.major)
    types = {row[0] for row in pg.execute("SELECT DISTINCT backend_type FROM pg_stat_activity")}
    assert {"checkpointer", "walwriter", "autovacuum launcher", "client backend"} <= types


@pytest.mark.parametrize("state", ["idle", "idle in transaction", "idle in transaction (aborted)", "active"])
def test_sessions_can_be_opened_in_each_state(pg: PgServer, state: str) -> None:
    pg.create_role(f"harness_{state.replace(' ', '_').strip('()')[:20]}_{pg.port}")
    session = pg.open_session(state, application_name="harness-check")  # type: ignore[arg-type]
    rows = pg.execute("SELECT state, application_name FROM pg_stat_activity WHERE pid = %s", (session.pid,))
    assert rows == [(state, "harness-check")]
    session.close()
    pg.wait_gone(session.pid)


def test_two_servers_can_share_a_port_on_distinct_loopback_addresses(pg_factory) -> None:  # type: ignore[no-untyped-def]
    first = pg_factory(host="127.0.0.2")
    second = pg_factory(host="127.0.0.3", port=first.port)
    assert first.port == second.port
    first.execute("CREATE TABLE marker (x int)")
    assert second.execute("SELECT to_regclass('marker') IS NULL") == [(True,)]
