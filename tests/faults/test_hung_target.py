"""A hung target never stalls anything: every evaluation ends within a bound, and a wedged server's
policies wait for their own connection outside the operator-wide concurrency slots.

Wedged means: a relay standing at the pod's IP that stops forwarding (established connections go
silent, new ones are accepted and never answered), as a network blackhole or a stopped host would.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from psycopg import conninfo

from pgwarden.cli import EXIT_UNREACHABLE
from pgwarden.enforcement.pool import ConnectionPool
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate
from pgwarden.enforcement.targets import PodInfo
from pgwarden.enforcement.worker import PolicyWorker, wait_for_work
from pgwarden.engine import session as session_module
from pgwarden.engine.connection import parse_dsn
from pgwarden.engine.errors import TargetUnreachable
from pgwarden.engine.session import EVALUATION_TIMEOUT_SECONDS, TargetSession
from tests.fixtures.postgres import PgFactory
from tests.harness.cli import policy_file
from tests.harness.credentials import FixedCredentials
from tests.harness.engine import spec_of
from tests.harness.faults import Relay, Stopwatch, report_figures
from tests.harness.postgres import PgServer, free_port

pytestmark = pytest.mark.pg

_octets = itertools.count(10)
PASSWORD = "Hung-Target-Pa55"
BOUND = 30.0  # the documented ceiling: EVALUATION_TIMEOUT_SECONDS plus psycopg's cancel attempt (<= 25 s)
OPERATOR = Path(__file__).resolve().parents[2] / "operator"


def next_host() -> str:
    return f"127.0.{next(_octets)}.45"


def test_enforce_once_against_a_server_that_never_answers_exits_3_within_the_bound(tmp_path: Path) -> None:
    host = next_host()
    with Relay(host, free_port(host)) as silent:  # accepts TCP, never says a word
        clock = Stopwatch()
        result = subprocess.run(
            [
                *(sys.executable, "-m", "pgwarden", "enforce", "--once", "--policy", str(policy_file(tmp_path, "x"))),
                *("--dsn", f"host={host} port={silent.port} user=warden dbname=postgres"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": str(OPERATOR)},
        )
        elapsed = clock()
        assert silent.accepted >= 1
    report_figures("server accepts TCP, never answers", "blackhole relay; pgwarden enforce --once", detect_s=elapsed)
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    assert elapsed < BOUND
    assert "timeout" in result.stderr.lower() or "did not answer" in result.stderr


async def test_server_going_silent_after_connect_is_cut_at_the_bound(pg: PgServer) -> None:
    host = next_host()
    with Relay(host, free_port(host), (pg.host, pg.port)) as relay:
        session = TargetSession(parse_dsn(f"host={host} port={relay.port} user=postgres dbname=postgres"))
        try:
            await session.run(spec_of(), policy="silent")
            relay.set_mode("blackhole")
            clock = Stopwatch()
            with pytest.raises(TargetUnreachable, match=r"did not answer within \S+ s while running the cycle"):
                await session.run(spec_of(), policy="silent")
            elapsed = clock()
        finally:
            relay.set_mode("reset")
            await session.close()
    report_figures(
        "server silent after connect", "relay stops forwarding mid-session (TargetSession)", detect_s=elapsed
    )
    assert EVALUATION_TIMEOUT_SECONDS <= elapsed < BOUND


async def test_a_cycle_that_outlives_its_severed_socket_is_ended_by_the_backstop(
    pg: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline severs the socket, which ends any statement; a cycle stuck elsewhere (here: one that
    waits on nothing the socket can end) is cut SEVER_GRACE_SECONDS later, and its connection dropped."""
    never = asyncio.Event()

    async def stuck_cycle(*args: Any, **kwargs: Any) -> None:
        await never.wait()

    session = TargetSession(parse_dsn(pg.dsn(dbname="postgres")), evaluation_timeout=0.5)
    try:
        await session.run(spec_of(), policy="stuck")  # connected, one real cycle
        backend = (await session.connection()).info.backend_pid
        monkeypatch.setattr(session_module, "run_cycle", stuck_cycle)
        monkeypatch.setattr(session_module, "SEVER_GRACE_SECONDS", 0.5)
        clock = Stopwatch()
        async with asyncio.timeout(20):  # without the backstop the cycle would never end
            with pytest.raises(TargetUnreachable, match=r"did not answer within 0.5 s while running the cycle"):
                await session.run(spec_of(), policy="stuck")
        elapsed = clock()
    finally:
        await session.close()
    assert 1.0 <= elapsed < 5.0
    pg.wait_gone(backend)  # abandoned: the server sees the connection closed


def policy(name: str, app: str, port: int) -> dict[str, Any]:
    spec = {
        "selector": {"matchLabels": {"app": app}},
        "connection": {"port": port, "credentialsSecret": {"name": "creds"}},
        "interval": "2s",
        "limits": {"maxActionsPerCycle": 50, "maxFractionPerCycle": 1.0},
        "sessions": [
            {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "1s", "applicationNames": ["web"]}
        ],
    }
    return {"metadata": {"name": name, "namespace": "faults", "generation": 1}, "spec": spec}


def prepare(server: PgServer) -> None:
    server.create_role("warden", password=PASSWORD, grants=("pg_signal_backend", "pg_read_all_stats"))
    server.create_role("app", password=PASSWORD)


async def test_wedged_target_with_many_policies_never_stalls_healthy_ones(pg_factory: PgFactory) -> None:
    healthy = pg_factory(host=next_host(), hba="password")
    behind = pg_factory(host=next_host(), hba="password")
    for server in (healthy, behind):
        prepare(server)
    relay_host = next_host()
    updates: dict[str, list[tuple[float, TargetUpdate]]] = defaultdict(list)

    def sink(name: str) -> Any:
        async def write(batch: list[TargetUpdate], owned: list[str], cond: PolicyCondition | None, inv: bool) -> None:
            updates[name].extend((time.monotonic(), u) for u in batch)

        return write

    with Relay(relay_host, free_port(relay_host), (behind.host, behind.port)) as relay:
        pods = [
            PodInfo("db-healthy", "faults", "Running", healthy.host, {"app": "healthy"}),
            PodInfo("db-wedged", "faults", "Running", relay_host, {"app": "wedged"}),
        ]
        slots = asyncio.Semaphore(2)  # fewer slots than policies on the wedged pod: the 33 on 32
        pool = ConnectionPool()
        bodies = {f"wedged-{i}": policy(f"wedged-{i}", "wedged", relay.port) for i in range(6)}
        bodies["healthy"] = policy("healthy", "healthy", healthy.port)
        workers = {
            name: PolicyWorker(
                "faults", name, FixedCredentials("warden", PASSWORD), pool.acquire, sink(name), lambda e: None, slots
            )
            for name in bodies
        }
        stop = asyncio.Event()

        async def drive(name: str) -> None:
            while not stop.is_set():
                delay = await workers[name].step(bodies[name], pods)
                await wait_for_work(delay, workers[name].inflight(), stop.wait())

        drivers = [asyncio.create_task(drive(name)) for name in workers]
        try:
            # Every wedged policy has its connection, then the relay goes silent.
            deadline = time.monotonic() + 30
            while not all(any(u.report for _, u in updates[n]) for n in bodies):
                assert time.monotonic() < deadline, "every policy evaluated once"
                await asyncio.sleep(0.1)
            relay.set_mode("blackhole")
            wedged_at = time.monotonic()
            bystander = await asyncio.to_thread(healthy.open_session, "idle", user="app", password=PASSWORD)
            reaped = []
            # Longer than the bound: the whole time a wedged evaluation can hold anything.
            while time.monotonic() - wedged_at < EVALUATION_TIMEOUT_SECONDS + 10:
                victim = await asyncio.to_thread(
                    healthy.open_session, "idle", user="app", password=PASSWORD, application_name="web"
                )
                opened = time.monotonic()
                await asyncio.to_thread(healthy.wait_gone, victim.pid, 6.0)  # interval 2 s + stateAge 1 s + slack
                reaped.append(time.monotonic() - opened)
            failures = [
                t - wedged_at
                for n in bodies
                if n != "healthy"
                for t, u in updates[n]
                if t > wedged_at and u.pod == "db-wedged" and u.error
            ]
            assert failures, "the wedged target is reported"
            detected = min(failures)
            assert detected < BOUND
            assert await asyncio.to_thread(healthy.alive, bystander.pid)  # never signalled: not its application
        finally:
            relay.set_mode("reset")
            stop.set()
            await asyncio.gather(*drivers, return_exceptions=True)
            for worker in workers.values():
                await worker.close()
    report_figures(
        "wedged pod, 6 policies on 2 slots",
        "blackhole relay at the pod IP after connect (PolicyWorker + pool)",
        detect_s=detected,
        recover_s=max(reaped),
    )


def test_tcp_keepalives_and_user_timeout_are_set_unless_the_dsn_chose() -> None:
    params = conninfo.conninfo_to_dict(parse_dsn("host=db.example user=guard").conninfo)
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "10"
    assert params["keepalives_interval"] == "5"
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "15000"
    assert params["connect_timeout"] == "5"
    own = conninfo.conninfo_to_dict(parse_dsn("host=db.example tcp_user_timeout=3000").conninfo)
    assert own["tcp_user_timeout"] == "3000"
