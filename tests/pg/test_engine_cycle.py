"""A whole cycle and the adapters around it: process counts, the autovacuum step, the controller's EngineTarget."""

from __future__ import annotations

import pytest

from pgwarden.engine.session import EngineTarget
from tests.harness.engine import enforce, spec_of, unique
from tests.harness.postgres import PgServer

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
