"""The autovacuum worker cap on real PostgreSQL 15 and 18: the setting, its release, privileges, real workers.

Every test starts a dedicated server: they ALTER SYSTEM and restart it. The wraparound skip is covered in
tests/unit/test_autovacuum_plan.py: an anti-wraparound worker cannot be provoked here on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import psycopg
import pytest

from pgwarden.engine.autovacuum import enforce_autovacuum, release_autovacuum
from pgwarden.engine.cycle import run_cycle
from pgwarden.policy.model import Autovacuum
from tests.fixtures.postgres import PgFactory
from tests.harness.engine import spec_of
from tests.harness.postgres import PgServer

pytestmark = pytest.mark.pg

CAP_2 = Autovacuum(max_workers=2)
BUSY_AUTOVACUUM = {
    "autovacuum_naptime": "1s",
    "autovacuum_max_workers": "5",
    # Sleep after nearly every page, so each worker stays on its table for tens of seconds.
    "autovacuum_vacuum_cost_delay": "100ms",
    "autovacuum_vacuum_cost_limit": "1",
}


@contextlib.asynccontextmanager
async def warden(server: PgServer, user: str = "postgres") -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection like the cycle's: autocommit, application_name 'pgwarden', timeouts set."""
    conn = await psycopg.AsyncConnection.connect(
        server.dsn(
            user, via_socket=True, application_name="pgwarden", options="-c statement_timeout=10s -c lock_timeout=2s"
        ),
        autocommit=True,
    )
    try:
        yield conn
    finally:
        await conn.close()


async def poll(predicate: Callable[[], Any], *, within: float, message: str) -> Any:
    """Poll `predicate` until truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {message}")
        await asyncio.sleep(0.1)


def in_pg_settings(server: PgServer) -> tuple[str, bool]:
    rows = server.execute("SELECT setting, pending_restart FROM pg_settings WHERE name = 'autovacuum_max_workers'")
    return rows[0][0], rows[0][1]


def in_auto_conf(server: PgServer) -> list[str]:
    """autovacuum_max_workers lines of postgresql.auto.conf, as pg_file_settings shows them."""
    rows = server.execute(
        "SELECT setting FROM pg_file_settings WHERE name = 'autovacuum_max_workers' "
        "AND sourcefile LIKE '%/postgresql.auto.conf' ORDER BY seqno"
    )
    return [r[0] for r in rows]


def auto_conf_stamp(server: PgServer) -> tuple[int, int]:
    """ALTER SYSTEM replaces postgresql.auto.conf by rename: a new inode and mtime show any write at all."""
    st = (server.datadir / "postgresql.auto.conf").stat()
    return st.st_ino, st.st_mtime_ns


def terminated_in_log(server: PgServer) -> set[int]:
    """Pids of autovacuum workers the server log says were ended by a signal (default log_line_prefix '%m [%p] ')."""
    log = (server.basedir / "server.log").read_text(errors="replace")
    return {int(pid) for pid in re.findall(r"\[(\d+)\] FATAL:  terminating autovacuum process", log)}


def workers(server: PgServer) -> dict[int, datetime]:
    rows = server.execute("SELECT pid, backend_start FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
    return dict(rows)


async def test_version_paths_reload_on_18_pending_restart_before(pg_factory: PgFactory, pg_major: str) -> None:
    server = pg_factory()
    async with warden(server) as conn:
        report = await enforce_autovacuum(conn, CAP_2, dry_run=False)
    assert report.errors == []
    assert report.written
    assert in_auto_conf(server) == ["2"]
    if int(pg_major) >= 18:
        assert report.to_json()["maxWorkers"] == {
            "desired": 2,
            "inForce": 2,
            "written": True,
            "pendingRestart": False,
            "pendingValue": None,
            "workerSlots": 16,
            "wouldWrite": False,
        }
        assert in_pg_settings(server) == ("2", False)
    else:
        assert (report.in_force, report.pending_restart, report.pending_value) == (3, True, 2)
        assert in_pg_settings(server) == ("3", True)

    # The next cycle finds its value written (and on 15 pending): it writes nothing again.
    stamp = auto_conf_stamp(server)
    async with warden(server) as conn:
        again = await enforce_autovacuum(conn, CAP_2, dry_run=False)
    assert (again.written, again.errors, again.warnings) == (False, [], [])
    assert again.pending_restart == (int(pg_major) < 18)
    assert auto_conf_stamp(server) == stamp

    server.restart()
    assert in_pg_settings(server) == ("2", False)
    async with warden(server) as conn:
        after = await enforce_autovacuum(conn, CAP_2, dry_run=False)
    assert (after.in_force, after.written, after.pending_restart, after.pending_value) == (2, False, False, None)
    assert after.errors == []


async def test_slots_limit_refuses_more_workers_than_slots_on_18(pg_factory: PgFactory, pg_major: str) -> None:
    if int(pg_major) < 18:
        # No slots limit before 18: a large cap is written, pending a restart, with no error.
        server = pg_factory()
        async with warden(server) as conn:
            big = await enforce_autovacuum(conn, Autovacuum(max_workers=6), dry_run=False)
        assert big.errors == []
        assert big.worker_slots is None
        assert (big.written, big.pending_restart, big.in_force) == (True, True, 3)
        return
    server = pg_factory(settings={"autovacuum_worker_slots": "4"})
    stamp = auto_conf_stamp(server)
    async with warden(server) as conn:
        refused = await enforce_autovacuum(conn, Autovacuum(max_workers=6), dry_run=False)
        assert not refused.written
        assert len(refused.errors) == 1
        assert "to 6" in refused.errors[0]
        assert "autovacuum_worker_slots = 4" in refused.errors[0]
        assert refused.worker_slots == 4
        assert in_pg_settings(server) == ("3", False)
        assert in_auto_conf(server) == []
        assert auto_conf_stamp(server) == stamp

        at_limit = await enforce_autovacuum(conn, Autovacuum(max_workers=4), dry_run=False)
    assert at_limit.errors == []
    assert (at_limit.written, at_limit.in_force) == (True, 4)


async def test_release_resets_only_the_value_pgwarden_wrote(pg_factory: PgFactory, pg_major: str) -> None:
    server = pg_factory()
    async with warden(server) as conn:
        assert (await enforce_autovacuum(conn, CAP_2, dry_run=False)).written
        stamp = auto_conf_stamp(server)
        would = await release_autovacuum(conn, 2, dry_run=True)
        assert (would.outcome, would.reset) == ("wouldReset", False)
        assert auto_conf_stamp(server) == stamp

        released = await release_autovacuum(conn, 2)
        assert released.errors == []
        assert (released.outcome, released.reset, released.found) == ("reset", True, "2")
        assert in_auto_conf(server) == []
        # 18 reverts on reload; 15 never applied the 2, so nothing is pending either.
        assert (released.in_force, released.pending_restart) == (3, False)
        assert in_pg_settings(server)[0] == "3"

        assert (await release_autovacuum(conn, 2)).outcome == "absent"

        # Someone else changes it after pgwarden: release leaves their value and says so.
        assert (await enforce_autovacuum(conn, CAP_2, dry_run=False)).written
        server.execute("ALTER SYSTEM SET autovacuum_max_workers = 4")
        server.execute("SELECT pg_reload_conf()")
        left = await release_autovacuum(conn, 2)
    assert (left.outcome, left.reset, left.found) == ("changed", False, "4")
    assert "4" in left.message
    assert "2 pgwarden wrote" in left.message
    assert in_auto_conf(server) == ["4"]


async def test_release_of_an_applied_value_waits_for_a_restart_before_18(pg_factory: PgFactory, pg_major: str) -> None:
    server = pg_factory()
    async with warden(server) as conn:
        assert (await enforce_autovacuum(conn, CAP_2, dry_run=False)).written
    server.restart()
    async with warden(server) as conn:
        released = await release_autovacuum(conn, 2)
    assert released.outcome == "reset"
    if int(pg_major) >= 18:
        assert (released.in_force, released.pending_restart) == (3, False)
    else:
        assert (released.in_force, released.pending_restart) == (2, True)
        server.restart()
    assert in_pg_settings(server) == ("3", False)


async def test_missing_alter_system_grant_is_named(pg_factory: PgFactory, pg_major: str) -> None:
    server = pg_factory()
    server.create_role("warden", grants=("pg_signal_backend",))
    stamp = auto_conf_stamp(server)
    spec = Autovacuum(max_workers=2, cancel_excess_workers=True)
    async with warden(server, "warden") as conn:
        denied = await enforce_autovacuum(conn, spec, dry_run=False)
    assert not denied.written
    assert any("GRANT pg_read_all_stats TO" in e for e in denied.errors)  # cannot even see the workers
    assert denied.running_workers is None
    assert in_pg_settings(server) == ("3", False)
    assert auto_conf_stamp(server) == stamp
    if int(pg_major) < 15:  # no GRANT ALTER SYSTEM ON PARAMETER before 15: only a superuser may write
        assert any("SUPERUSER (PostgreSQL 14 and earlier let only superusers ALTER SYSTEM)" in e for e in denied.errors)
        return
    assert any('GRANT ALTER SYSTEM ON PARAMETER autovacuum_max_workers TO "warden"' in e for e in denied.errors)

    server.execute("GRANT ALTER SYSTEM ON PARAMETER autovacuum_max_workers TO warden")
    async with warden(server, "warden") as conn:
        no_reload = await enforce_autovacuum(conn, CAP_2, dry_run=False)
    assert not no_reload.written
    assert len(no_reload.errors) == 1
    assert "GRANT ALTER SYSTEM" not in no_reload.errors[0]
    assert "GRANT EXECUTE ON FUNCTION pg_catalog.pg_reload_conf()" in no_reload.errors[0]

    server.execute("GRANT EXECUTE ON FUNCTION pg_reload_conf() TO warden")
    async with warden(server, "warden") as conn:
        granted = await enforce_autovacuum(conn, CAP_2, dry_run=False)
        assert granted.errors == []
        assert granted.written
        stamp = auto_conf_stamp(server)
        # Without pg_file_settings the next cycle must still not write again.
        again = await enforce_autovacuum(conn, CAP_2, dry_run=False)
        assert not again.written
        assert auto_conf_stamp(server) == stamp
        released = await release_autovacuum(conn, 2)
    assert in_auto_conf(server) == ["2"]
    if int(pg_major) >= 18:
        assert (granted.in_force, granted.pending_restart) == (2, False)
        assert again.warnings == []
    else:
        # Pending a restart, with a value this role cannot read.
        assert (granted.in_force, granted.pending_restart, granted.pending_value) == (3, True, None)
        assert len(again.warnings) == 1
        assert "pg_file_settings" in again.warnings[0]
    assert (released.outcome, released.reset) == ("unreadable", False)
    assert "pg_file_settings" in released.message


async def test_dry_run_writes_nothing(pg_factory: PgFactory) -> None:
    server = pg_factory()
    before = (in_pg_settings(server), in_auto_conf(server), auto_conf_stamp(server))
    async with warden(server) as conn:
        report = await enforce_autovacuum(conn, Autovacuum(max_workers=2, cancel_excess_workers=True), dry_run=True)
    assert report.errors == []
    assert (report.would_write, report.written, report.dry_run) == (True, False, True)
    assert report.to_json()["maxWorkers"]["wouldWrite"] is True
    assert (in_pg_settings(server), in_auto_conf(server), auto_conf_stamp(server)) == before


async def test_excess_workers_are_stopped_newest_first(pg_factory: PgFactory, pg_major: str) -> None:
    server = pg_factory(settings=BUSY_AUTOVACUUM)
    # Analyze the fresh catalogs now, so the only autovacuum work left is the long vacuums below.
    server.execute("VACUUM ANALYZE", dbname="template1")
    server.execute("VACUUM ANALYZE")
    # More tables than workers, each all dead tuples: a worker whose vacuum is merely cancelled would move
    # on to the next table and keep running, so only ending the process brings the count down.
    for i in range(8):
        server.execute(
            f"CREATE TABLE dead_{i} (id int, v int) WITH (autovacuum_vacuum_threshold = 0, "
            "autovacuum_vacuum_scale_factor = 0, autovacuum_analyze_threshold = 2000000000)"
        )
        server.execute(f"INSERT INTO dead_{i} SELECT g, g FROM generate_series(1, 20000) g")
        server.execute(f"DELETE FROM dead_{i}")
    server.create_role("watcher", grants=("pg_signal_backend", "pg_read_all_stats"))
    if int(pg_major) >= 18:
        # PostgreSQL 18's way: no superuser, the new role plus the setting's grants.
        server.create_role("capper", grants=("pg_signal_autovacuum_worker", "pg_read_all_stats"))
        server.execute("GRANT ALTER SYSTEM ON PARAMETER autovacuum_max_workers TO capper")
        server.execute("GRANT EXECUTE ON FUNCTION pg_reload_conf() TO capper")
        capper = "capper"
    else:
        capper = "postgres"
    spec = Autovacuum(max_workers=2, cancel_excess_workers=True)
    await poll(lambda: len(workers(server)) >= 4, within=60, message="at least 4 autovacuum workers")

    async with warden(server) as conn:
        dry = await enforce_autovacuum(conn, spec, dry_run=True)
    assert dry.errors == []
    assert dry.running_workers is not None
    assert dry.running_workers > 2  # a worker may finish meanwhile; the poll saw at least 4
    assert len(dry.would_cancel) == dry.running_workers - 2
    assert dry.cancelled == []
    assert terminated_in_log(server) == set()
    assert in_pg_settings(server)[0] == "5"

    async with warden(server, "watcher") as conn:
        denied = await enforce_autovacuum(conn, spec, dry_run=False)
    assert denied.cancelled == []
    assert denied.running_workers is not None
    assert denied.running_workers > 2
    write_grant = "GRANT ALTER SYSTEM ON PARAMETER" if int(pg_major) >= 15 else "SUPERUSER (PostgreSQL 14 and earlier"
    assert any(write_grant in e for e in denied.errors)
    signal_role = "pg_signal_autovacuum_worker" if int(pg_major) >= 18 else "not a superuser"
    assert any(signal_role in e and '"watcher"' in e for e in denied.errors)
    assert terminated_in_log(server) == set()

    before = workers(server)
    async with warden(server, capper) as conn:
        report = await enforce_autovacuum(conn, spec, dry_run=False)
    assert report.errors == []
    assert report.written
    assert report.running_workers is not None
    assert report.cancelled
    assert {s.reason for s in report.skipped} <= {"exited"}
    assert len(report.cancelled) + len(report.skipped) == report.running_workers - 2
    # Newest first: every stopped worker started no earlier than every kept one seen before.
    kept = set(before) - set(report.cancelled)
    for pid in set(report.cancelled) & set(before):
        assert all(before[pid] >= before[other] for other in kept)
    await poll(lambda: not set(report.cancelled) & set(workers(server)), within=10, message="stopped workers to exit")
    await poll(lambda: terminated_in_log(server) == set(report.cancelled), within=10, message="terminations in the log")

    if int(pg_major) >= 18:
        assert (report.in_force, report.pending_restart) == (2, False)
        await poll(lambda: len(workers(server)) <= 2, within=10, message="at most 2 autovacuum workers")
    else:
        # 15 still allows 5 until a restart, and its launcher fills the freed slots again.
        assert (report.in_force, report.pending_restart, report.pending_value) == (5, True, 2)
        server.restart()
        await poll(lambda: workers(server), within=30, message="autovacuum workers after the restart")
    async with warden(server, capper) as conn:
        settled = await enforce_autovacuum(conn, spec, dry_run=False)
    assert settled.errors == []
    assert (settled.in_force, settled.written, settled.cancelled) == (2, False, [])
    assert settled.running_workers is not None
    assert settled.running_workers <= 2
    assert len(workers(server)) <= 2


async def test_the_write_is_recorded_before_it_is_made_and_never_made_unrecorded(pg_factory: PgFactory) -> None:
    """The write-ahead hook runs before ALTER SYSTEM (the file does not hold the value yet), once; a hook that
    fails (status not written) means no write at all; a value already in the file is not written again."""
    server = pg_factory()
    seen: list[tuple[int, list[str]]] = []

    async def record(value: int) -> None:
        seen.append((value, in_auto_conf(server)))

    async def refuse(value: int) -> None:
        raise RuntimeError("status not written")

    before = auto_conf_stamp(server)
    async with warden(server) as conn:
        refused = await enforce_autovacuum(conn, CAP_2, dry_run=False, before_write=refuse)
        assert (refused.written, in_auto_conf(server), auto_conf_stamp(server)) == (False, [], before)
        assert any("recording the write first failed" in e for e in refused.errors)
        report = await enforce_autovacuum(conn, CAP_2, dry_run=False, before_write=record)
        assert report.written
        assert seen == [(2, [])]
        assert in_auto_conf(server) == ["2"]
        again = await enforce_autovacuum(conn, CAP_2, dry_run=False, before_write=record)
    assert not again.written
    assert seen == [(2, [])]


async def test_two_policies_with_different_caps_on_one_server_write_once_then_both_report_the_conflict(
    pg_factory: PgFactory,
) -> None:
    """The first policy writes; the second, and from then on the first too, write nothing and name each other;
    postgresql.auto.conf is written exactly once. Once the second gives up its cap, the first goes on alone."""
    server = pg_factory()
    target = f"{server.host}:{server.port}"  # both cycles name the server as the controller does
    first = spec_of(sessions=[], autovacuum={"maxWorkers": 2})
    second = spec_of(sessions=[], autovacuum={"maxWorkers": 3})
    async with warden(server) as conn:
        a1 = await run_cycle(conn, first, policy="ns/cap-a", target=target)
        assert a1.autovacuum is not None
        assert a1.autovacuum.written
        stamp = auto_conf_stamp(server)
        b1 = await run_cycle(conn, second, policy="ns/cap-b", target=target)
        a2 = await run_cycle(conn, first, policy="ns/cap-a", target=target)
        b2 = await run_cycle(conn, second, policy="ns/cap-b", target=target)
        for report, other in ((b1, "ns/cap-a"), (a2, "ns/cap-b"), (b2, "ns/cap-a")):
            assert report.autovacuum is not None
            assert report.autovacuum.conflicts_with == [other]
            assert not report.autovacuum.written
            assert any(other in e and "conflict" in e for e in report.errors)
        assert (auto_conf_stamp(server), in_auto_conf(server)) == (stamp, ["2"])
        await run_cycle(conn, spec_of(sessions=[]), policy="ns/cap-b", target=target)  # cap-b drops its cap
        a3 = await run_cycle(conn, first, policy="ns/cap-a", target=target)
    assert a3.autovacuum is not None
    assert a3.autovacuum.conflicts_with == []
    assert in_auto_conf(server) == ["2"]
