"""A whole cycle and the adapters around it: process counts, the autovacuum step, the controller's EngineTarget."""

from __future__ import annotations

import pytest

from pgwarden.engine.connection import connect, parse_dsn, target_of
from pgwarden.engine.cycle import run_cycle
from pgwarden.engine.errors import TargetNotConfirmed
from pgwarden.engine.session import EngineTarget
from tests.harness.engine import enforce, spec_of, unique
from tests.harness.postgres import PgServer, wait_for

pytestmark = pytest.mark.pg


async def test_process_counts_match_pg_stat_activity(pg: PgServer, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    for state in ("idle", "idle", "active", "idle in transaction", "idle in transaction (aborted)"):
        pg.open_session(state, application_name=app)
    report = await enforce(pg, spec_of())
    truth = dict(pg.execute("SELECT backend_type, count(*) FROM pg_stat_activity GROUP BY 1"))
    # The check runs one more client backend (its own connection) than the cycle saw, and the cycle's own
    # connection is gone; the background processes must agree exactly.
    assert {k: v for k, v in report.backends.items() if k != "client backend"} == {
        k: v for k, v in truth.items() if k != "client backend"
    }
    assert {"checkpointer", "walwriter", "autovacuum launcher", "client backend"} <= set(report.backends)
    assert report.client_states["idle"] >= 2
    assert report.client_states["idle in transaction"] >= 1
    assert report.client_states["idle in transaction (aborted)"] >= 1
    assert report.client_states["active"] >= 2  # the engine itself is active while it looks
    assert sum(report.client_states.values()) == report.backends["client backend"]
    assert report.server_version.split(".")[0] == pg.major


async def test_autovacuum_is_reported_only_when_configured(pg: PgServer) -> None:
    before = pg.execute("SELECT setting FROM pg_settings WHERE name = 'autovacuum_max_workers'")
    without = await enforce(pg, spec_of())
    assert "autovacuum" not in without.to_json()
    dry = await enforce(pg, spec_of(autovacuum={"maxWorkers": 1}), dry_run=True)
    out = dry.to_json()
    assert out["autovacuum"]["dryRun"] is True
    assert out["autovacuum"]["maxWorkers"]["desired"] == 1
    assert list(out)[-1] == "autovacuum"
    assert pg.execute("SELECT setting FROM pg_settings WHERE name = 'autovacuum_max_workers'") == before
    assert pg.execute("SELECT count(*) FROM pg_file_settings WHERE name = 'autovacuum_max_workers'") == [(0,)]


async def test_engine_target_for_the_controller(pg: PgServer, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    victim = pg.open_session("idle", application_name=app)
    waiting = pg.open_session("idle", application_name=f"{app}-later")
    spec = spec_of(
        sessions=[
            {"name": "now", "action": "terminate", "connectionAge": "0s", "applicationNames": [app]},
            {"name": "later", "action": "terminate", "stateAge": "30s", "applicationNames": [f"{app}-later"]},
        ]
    )
    target = EngineTarget(  # the shared server trusts 127/8: no password method to require (requireAuth any)
        host=pg.host,
        port=pg.port,
        dbname="postgres",
        user="postgres",
        password=None,
        sslmode="disable",
        require_auth="any",
    )
    try:
        report, next_in = await target.evaluate(spec, policy="ns/p", target="pod-0")
        assert report.policy == "ns/p"
        assert report.target == "pod-0"
        assert [a.pid for a in report.actions] == [victim.pid]
        assert next_in is not None
        assert 29 < next_in <= 30.2
        released = await target.release_autovacuum(3)
        assert released.outcome == "absent"
    finally:
        await target.close()
    pg.wait_gone(victim.pid)
    assert pg.alive(waiting.pid)
    from_dsn = EngineTarget.from_dsn(pg.dsn(via_socket=True))
    try:
        report, _ = await from_dsn.evaluate(spec_of(), policy="p", target="local")
        assert report.server_version.split(".")[0] == pg.major
    finally:
        await from_dsn.close()


async def test_a_new_connection_is_checked_before_anything_is_done_on_it(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    """The controller's address check runs once per connection, before the first signal or write; a refusal
    leaves every session alone, and a silent reconnect (the engine's own backend terminated) is checked anew."""
    app = unique(request)
    spec = spec_of(sessions=[{"name": "now", "action": "terminate", "connectionAge": "0s", "applicationNames": [app]}])
    checks: list[str] = []
    verdict = ["refuse"]

    async def check() -> None:
        checks.append(verdict[0])
        if verdict[0] == "refuse":
            raise RuntimeError("pod db-0 now has address 10.0.0.9")

    target = EngineTarget(
        host=pg.host,
        port=pg.port,
        dbname="postgres",
        user="postgres",
        password=None,
        sslmode="disable",
        require_auth="any",
    )
    victim = pg.open_session("idle", application_name=app)
    try:
        with pytest.raises(TargetNotConfirmed, match="nothing done on a new connection: pod db-0 now has address"):
            await target.evaluate(spec, policy="ns/p", target="pod-0", check=check)
        assert pg.alive(victim.pid)
        with pytest.raises(TargetNotConfirmed):  # still unchecked: asked again, refused again
            await target.release_autovacuum(3, check)
        verdict[0] = "pass"
        report, _ = await target.evaluate(spec, policy="ns/p", target="pod-0", check=check)
        assert [a.pid for a in report.actions] == [victim.pid]
        await target.evaluate(spec, policy="ns/p", target="pod-0", check=check)
        assert checks == ["refuse", "refuse", "pass"]  # once per connection, not per cycle
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgwarden'"
            " AND pid <> pg_backend_pid()"
        )
        wait_for(
            lambda: not pg.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgwarden'"),
            message="the engine's own backend gone",
        )
        await target.evaluate(spec, policy="ns/p", target="pod-0", check=check)
        assert checks == ["refuse", "refuse", "pass", "pass"]  # the reconnect was checked before acting
    finally:
        await target.close()


async def test_the_observation_is_prepared_from_its_first_run(pg: PgServer) -> None:
    """Unprepared, each run is parsed and planned afresh by the server (~1.4 ms of its CPU against ~0.15 ms),
    and psycopg prepares only from the fifth: after a restart, every target's server paid that four times."""
    conn = await connect(parse_dsn(pg.dsn()))
    try:
        await run_cycle(conn, spec_of(), policy="test", target=target_of(conn))
        cur = await conn.execute(
            "SELECT statement, generic_plans + custom_plans FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql"
        )
        prepared = await cur.fetchall()
    finally:
        await conn.close()
    assert [runs for statement, runs in prepared if "pg_stat_get_activity" in statement] == [1]
