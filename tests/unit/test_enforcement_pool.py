"""Policies that select one server share one engine connection; the last one to let go closes it."""

from __future__ import annotations

import pytest

from pgwarden.enforcement.pool import ConnectionPool, dsn_target
from pgwarden.enforcement.worker import Endpoint
from pgwarden.engine.session import EngineTarget

ENDPOINT = Endpoint("127.0.0.2", 5432, "postgres", "disable", "warden", "not-a-real-password")


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[EngineTarget]:
    """Engine targets closed so far (nothing connects: a target connects on first use only)."""
    seen: list[EngineTarget] = []

    async def close(self: EngineTarget) -> None:
        seen.append(self)

    monkeypatch.setattr(EngineTarget, "close", close)
    return seen


async def test_policies_on_one_endpoint_share_a_connection_and_the_last_closes_it(closed: list[EngineTarget]) -> None:
    pool = ConnectionPool()
    first, second = pool.acquire(ENDPOINT), pool.acquire(ENDPOINT)
    (shared,) = pool.connections.values()
    assert shared.users == 2
    await first.close()
    assert closed == []
    assert pool.connections == {ENDPOINT: shared}
    await first.close()  # closing twice lets go once
    assert shared.users == 1
    await second.close()
    assert closed == [shared.target]
    assert pool.connections == {}
    with pytest.raises(RuntimeError, match="after close"):
        await second.release_autovacuum(2)


async def test_other_credentials_or_databases_get_their_own_connection(closed: list[EngineTarget]) -> None:
    pool = ConnectionPool()
    handles = [
        pool.acquire(ENDPOINT),
        pool.acquire(Endpoint("127.0.0.2", 5432, "postgres", "disable", "warden", "rotated-password")),
        pool.acquire(Endpoint("127.0.0.2", 5432, "shop", "disable", "warden", "not-a-real-password")),
    ]
    assert len(pool.connections) == 3
    for handle in handles:
        await handle.close()
    assert len(closed) == 3


async def test_a_sidecars_policies_share_the_one_connection_its_dsn_names(closed: list[EngineTarget]) -> None:
    pool = ConnectionPool(connect=dsn_target("host=/run/postgresql user=warden dbname=postgres"))
    local = Endpoint(host="local", port=0, dbname="", sslmode="", user=None)
    first, second = pool.acquire(local), pool.acquire(local)
    (shared,) = pool.connections.values()
    assert shared.users == 2
    await first.close()
    await second.close()
    assert closed == [shared.target]
