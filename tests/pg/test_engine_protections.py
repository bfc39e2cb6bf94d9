"""Built-in protections on a server of its own: a rule that matches everything still spares every process that
is not a client backend, including replication connections (physical streaming and logical)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.postgres import PgFactory
from tests.harness.engine import acted, enforce, spec_of, wait_all_gone
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer, wait_for

pytestmark = pytest.mark.pg

REPLICATION_HBA = "local replication all trust\nhost replication all 127.0.0.0/8 trust\n"


def _allow_replication(server: PgServer) -> None:
    with (server.datadir / "pg_hba.conf").open("a") as f:
        f.write(REPLICATION_HBA)
    server.execute("SELECT pg_reload_conf()")


def _replication_connection(server: PgServer, mode: str) -> psycopg.Connection[object]:
    def attempt() -> psycopg.Connection[object] | None:
        try:
            return psycopg.connect(server.dsn(replication=mode, application_name=f"repl-{mode}"), autocommit=True)
        except psycopg.OperationalError:  # the reload has not reached the postmaster yet
            return None

    conn: psycopg.Connection[object] = wait_for(attempt, message=f"a replication={mode} connection")
    return conn


@pytest.fixture
def receivewal(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def _non_client_processes(server: PgServer) -> set[tuple[int, str]]:
    rows = server.execute("SELECT pid, backend_type FROM pg_stat_activity WHERE backend_type <> 'client backend'")
    return {(pid, kind) for pid, kind in rows}


async def test_rule_matching_everything_spares_all_but_client_backends(
    pg_factory: PgFactory, tmp_path: Path, receivewal: list[subprocess.Popen[bytes]]
) -> None:
    server = pg_factory(host="127.0.0.4", ledger=True)
    _allow_replication(server)
    logical = _replication_connection(server, "database")
    physical = _replication_connection(server, "true")
    try:
        await _check_everything_rule(server, tmp_path, receivewal, logical, physical)
    finally:
        logical.close()
        physical.close()


def _stream_wal(server: PgServer, into: Path) -> subprocess.Popen[bytes]:
    """pg_receivewal: a physical replication client that keeps its walsender streaming (state 'active')."""
    command = [str(server.bindir / "pg_receivewal"), "-D", str(into), "-h", server.host, "-p", str(server.port)]
    return subprocess.Popen(
        [*command, "-U", "postgres", "--no-loop", "--no-password"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _check_everything_rule(
    server: PgServer,
    tmp_path: Path,
    receivewal: list[subprocess.Popen[bytes]],
    logical: psycopg.Connection[object],
    physical: psycopg.Connection[object],
) -> None:
    streaming = _stream_wal(server, tmp_path)
    receivewal.append(streaming)
    wait_for(
        lambda: server.execute(
            "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'walsender' AND application_name = 'pg_receivewal'"
            " AND state = 'active'"
        ),
        message="pg_receivewal to stream",
    )
    clients = [
        server.open_session(state, application_name="app") for state in ("idle", "active", "idle in transaction")
    ]
    before = _non_client_processes(server)
    kinds = {kind for _, kind in before}
    assert {"walsender", "checkpointer", "autovacuum launcher", "walwriter"} <= kinds
    assert sum(1 for _, kind in before if kind == "walsender") == 3

    everything = spec_of(sessions=[{"name": "all", "action": "terminate", "connectionAge": "0s"}])
    ledger = Ledger(server.logfile)
    report = await enforce(server, everything)
    assert acted(report) == {c.pid for c in clients}
    ledger.assert_agrees(acted(report))  # the server signalled those three and nothing else
    assert not {pid for pid, _ in before} & acted(report)
    wait_all_gone(server, acted(report))
    assert _non_client_processes(server) >= before  # every one of them still there
    assert streaming.poll() is None
    assert logical.execute("IDENTIFY_SYSTEM").fetchone() is not None
    assert physical.execute("IDENTIFY_SYSTEM").fetchone() is not None
    assert report.backends["walsender"] == 3
