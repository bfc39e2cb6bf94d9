"""Invariants proven against the server's own log (tests.harness.ledger): never the wrong session.

Each test compares what pgwarden reports with what PostgreSQL logged: who was terminated, and by whom.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from pgwarden.engine.act import act
from pgwarden.engine.connection import connect, parse_dsn
from pgwarden.engine.decide import plan
from pgwarden.engine.errors import CycleInterrupted, EngineError
from pgwarden.engine.observe import compile_observation, observe
from pgwarden.engine.report import CycleReport
from pgwarden.engine.scheduler import run_loop
from pgwarden.engine.session import TargetSession
from pgwarden.policy.api import SkipReason
from tests.fixtures.postgres import PgFactory
from tests.harness.cli import CODE_UNDER_TEST, PGWARDEN
from tests.harness.engine import acted, alive, enforce, spec_of, unique, wait_all_gone
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer, wait_for

pytestmark = pytest.mark.pg
log = structlog.get_logger("test")

GRANTS = ("pg_signal_backend", "pg_read_all_stats")
IDLE_NOW = [{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "0s"}]


async def test_pgwarden_never_signals_its_own_connections_in_any_process(
    pg_factory: PgFactory, request: pytest.FixtureRequest
) -> None:
    """Two engines with an unscoped idle rule, cycling back to back for 4 s: neither touches the other, nor a
    third pgwarden connection of its role; an application of another role that calls itself pgwarden is reaped."""
    server = pg_factory(ledger=True)
    ledger = Ledger(server.logfile)
    engine_role, app_role = unique(request, "warden"), unique(request, "app")
    server.create_role(engine_role, grants=GRANTS)
    server.create_role(app_role)
    fake = server.open_session("idle", user=app_role, application_name="pgwarden-fake")
    other_process = server.open_session("idle", user=engine_role, application_name="pgwarden-sidecar")
    engines = [TargetSession(parse_dsn(server.dsn(user=engine_role))) for _ in range(2)]
    spec = spec_of(sessions=IDLE_NOW)
    reports: list[CycleReport] = []
    stop = asyncio.Event()

    def failed(exc: EngineError, _: int) -> bool:
        return False  # a reaped engine connection fails its next cycle: end the loop and the test

    try:
        loops = [
            run_loop(
                functools.partial(engine.run, spec, policy="test"),
                interval=1.0,
                stop=stop,
                on_report=reports.append,
                on_error=failed,
            )
            for engine in engines
        ]
        asyncio.get_running_loop().call_later(4.0, stop.set)  # the bounded time both loops run
        await asyncio.gather(*loops)
        engine_pids = {(await engine.connection()).info.backend_pid for engine in engines}
    finally:
        for engine in engines:
            await engine.close()
    assert len(reports) >= 8  # both loops cycled all along (one cycle a second each)
    assert all(r.errors == [] for r in reports)
    reported = [pid for r in reports for pid in acted(r)]
    # Both engines may see the impostor in their first cycle and both signal it (two enforcers on one
    # server is the controller's to prevent); the server terminated it once.
    assert set(reported) == {fake.pid}
    ledger.assert_agrees([fake.pid], engine_pids=engine_pids)
    assert [(e.pid, e.user) for e in ledger.effects()] == [(fake.pid, app_role)]
    assert {s.pid for s in ledger.signals()} == {fake.pid}  # not even an attempt at anyone else
    assert alive(server, {other_process.pid}) == {other_process.pid}


async def test_superuser_sessions_never_eat_the_budget(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    """12 superuser and 10 application sessions, all idle, the superusers' the oldest; maxActionsPerCycle 10:
    one cycle of a non-superuser engine terminates all 10 application sessions and skips the 12 notPermitted."""
    app, engine_role = unique(request), unique(request, "warden")
    pg.create_role(engine_role, grants=GRANTS)
    supers = [pg.open_session("idle", application_name=app).pid for _ in range(12)]
    apps_role = unique(request, "app")
    pg.create_role(apps_role)
    apps = [pg.open_session("idle", user=apps_role, application_name=app).pid for _ in range(10)]
    spec = spec_of(
        limits={"maxActionsPerCycle": 10, "maxFractionPerCycle": 1.0},
        sessions=[{**IDLE_NOW[0], "applicationNames": [app]}],
    )
    report = await enforce(pg, spec, user=engine_role)
    assert acted(report) == set(apps)
    assert sorted((s.pid, s.reason) for s in report.skipped) == sorted((p, SkipReason.NOT_PERMITTED) for p in supers)
    assert report.errors == []
    wait_all_gone(pg, apps)
    assert alive(pg, supers) == set(supers)
    ledger.assert_agrees(apps)


async def test_a_refused_signal_gives_its_slot_to_the_next_session(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    """A session that became a superuser's between observation and signal is refused (permissionDenied);
    the next session the limit held back gets its slot in the same cycle, and only that one."""
    app, engine_role = unique(request), unique(request, "warden")
    turning_role, apps_role = unique(request, "turning"), unique(request, "app")
    for role in (turning_role, apps_role):
        pg.create_role(role)
    pg.create_role(engine_role, grants=GRANTS)
    turning = pg.open_session("idle", user=turning_role, application_name=app)  # oldest: planned first
    rest = [pg.open_session("idle", application_name=app, user=apps_role).pid for _ in range(2)]
    spec = spec_of(
        limits={"maxActionsPerCycle": 1, "maxFractionPerCycle": 1.0},
        sessions=[{**IDLE_NOW[0], "applicationNames": [app]}],
    )
    promote = psycopg.sql.SQL("ALTER ROLE {} SUPERUSER").format(psycopg.sql.Identifier(turning_role))
    demote = psycopg.sql.SQL("ALTER ROLE {} NOSUPERUSER").format(psycopg.sql.Identifier(turning_role))
    conn = await connect(parse_dsn(pg.dsn(user=engine_role)))
    try:
        decided = plan(await observe(conn, compile_observation(spec)), spec)
        assert [p.session.pid for p in decided.actions] == [turning.pid]
        pg.execute(promote)  # type: ignore[arg-type]
        outcome = await act(conn, decided.actions, log, reserve=decided.reserve)
    finally:
        await conn.close()
        pg.execute(demote)  # type: ignore[arg-type]
    assert [(s.pid, s.reason) for s in outcome.skipped] == [(turning.pid, SkipReason.PERMISSION_DENIED)]
    assert [a.pid for a in outcome.actions] == [rest[0]]
    assert outcome.from_reserve == {rest[0]}
    ledger.assert_agrees([rest[0]])
    assert alive(pg, {turning.pid, rest[1]}) == {turning.pid, rest[1]}


# -- missing grants are never silent -----------------------------------------------------------------------

PREFIX = "InsufficientPrivileges: "
COSTS = {
    "pg_read_all_stats": "other roles' sessions are invisible to it (counted as unknown) and never acted on",
    "pg_signal_backend": "other roles' sessions cannot be signalled (skipped as notPermitted)",
}


@pytest.mark.parametrize(
    ("grants", "missing"),
    [
        ((), ("pg_read_all_stats", "pg_signal_backend")),
        (("pg_read_all_stats",), ("pg_signal_backend",)),
        (("pg_signal_backend",), ("pg_read_all_stats",)),
        (GRANTS, ()),
    ],
)
async def test_each_missing_session_grant_is_named_every_cycle(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest, grants: tuple[str, ...], missing: tuple[str, ...]
) -> None:
    app, engine_role, apps_role = unique(request), unique(request, "warden"), unique(request, "app")
    pg.create_role(engine_role, grants=grants)
    pg.create_role(apps_role)
    victim = pg.open_session("idle", user=apps_role, application_name=app)
    spec = spec_of(sessions=[{**IDLE_NOW[0], "applicationNames": [app]}])
    for dry_run in (True, False):  # every cycle says so, dry run or not
        report = await enforce(pg, spec, user=engine_role, dry_run=dry_run)
        assert report.missing_privileges == missing
        assert [e for e in report.errors if e.startswith(PREFIX)] == [
            f'{PREFIX}role "{engine_role}" lacks {grant}: {COSTS[grant]}; GRANT {grant} TO "{engine_role}"'
            for grant in missing
        ]
        assert len(report.errors) == len(missing)  # nothing else went wrong
    if missing:
        assert pg.alive(victim.pid)
        assert ledger.terminated() == []
    else:
        ledger.assert_agrees([victim.pid])
    if missing == ("pg_signal_backend",):  # seen but not signalable: reported as such, never attempted
        assert [(s.pid, s.reason) for s in report.skipped] == [(victim.pid, SkipReason.NOT_PERMITTED)]
        assert ledger.signals() == []


async def test_a_superuser_engine_lacks_nothing(pg: PgServer) -> None:
    spec = spec_of(
        sessions=[{**IDLE_NOW[0], "applicationNames": ["none"]}],
        autovacuum={"maxWorkers": 3, "cancelExcessWorkers": True},
    )
    report = await enforce(pg, spec, dry_run=True)
    assert report.missing_privileges == ()
    assert not [e for e in report.errors if e.startswith(PREFIX)]


AUTOVACUUM_GRANTS = {
    "ALTER SYSTEM ON PARAMETER autovacuum_max_workers": "GRANT ALTER SYSTEM ON PARAMETER autovacuum_max_workers TO {}",
    "EXECUTE ON FUNCTION pg_catalog.pg_reload_conf()": "GRANT EXECUTE ON FUNCTION pg_catalog.pg_reload_conf() TO {}",
    "SELECT ON pg_catalog.pg_file_settings, EXECUTE ON FUNCTION pg_catalog.pg_show_all_file_settings()": (
        "GRANT SELECT ON pg_catalog.pg_file_settings TO {0}; "
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_show_all_file_settings() TO {0}"
    ),
}


ALTER_SYSTEM = "ALTER SYSTEM ON PARAMETER autovacuum_max_workers"


def grantable(pg_major: str) -> dict[str, str]:
    """The autovacuum grants this major has: GRANT ALTER SYSTEM ON PARAMETER is PostgreSQL 15+ (before, only a
    superuser may ALTER SYSTEM, and the engine names SUPERUSER instead)."""
    return {k: v for k, v in AUTOVACUUM_GRANTS.items() if k != ALTER_SYSTEM or int(pg_major) >= 15}


@pytest.mark.parametrize("withheld", [*AUTOVACUUM_GRANTS, None])
async def test_each_missing_autovacuum_grant_is_named(
    pg: PgServer, request: pytest.FixtureRequest, withheld: str | None, pg_major: str
) -> None:
    """The README's grants for the autovacuum cap, all given but one: exactly that one is named."""
    role = unique(request, "warden")
    pg.create_role(role, grants=GRANTS)
    with pg.connect() as conn:
        for name, grant in grantable(pg_major).items():
            if name != withheld:
                for statement in grant.split("; "):
                    conn.execute(psycopg.sql.SQL(statement).format(psycopg.sql.Identifier(role)))
    spec = spec_of(autovacuum={"maxWorkers": 3})
    report = await enforce(pg, spec, user=role, dry_run=True)
    if int(pg_major) < 15:  # the one grant no non-superuser can have there: named first, whatever else is given
        expected = ("SUPERUSER",) + (() if withheld in (None, ALTER_SYSTEM) else (withheld,))
        assert report.missing_privileges == expected
        return
    expected = () if withheld is None else (withheld,)
    assert report.missing_privileges == expected
    named = [e for e in report.errors if e.startswith(PREFIX)]
    if withheld is None:
        assert named == []
    else:
        assert named == [f'{PREFIX}role "{role}" lacks for the autovacuum cap: {withheld} (GRANT each TO "{role}")']


async def test_stopping_autovacuum_workers_names_the_version_s_grant(
    pg: PgServer, request: pytest.FixtureRequest, pg_major: str
) -> None:
    role = unique(request, "warden")
    pg.create_role(role, grants=GRANTS)
    with pg.connect() as conn:
        for grant in grantable(pg_major).values():
            for statement in grant.split("; "):
                conn.execute(psycopg.sql.SQL(statement).format(psycopg.sql.Identifier(role)))
    spec = spec_of(autovacuum={"maxWorkers": 3, "cancelExcessWorkers": True})
    report = await enforce(pg, spec, user=role, dry_run=True)
    if int(pg_major) < 15:
        assert report.missing_privileges == ("SUPERUSER",)  # to ALTER SYSTEM and to stop workers alike: named once
        return
    assert report.missing_privileges == (("pg_signal_autovacuum_worker",) if int(pg_major) >= 18 else ("SUPERUSER",))


# -- a step of the server's clock ---------------------------------------------------------------------------

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


class ServerClock:
    """Steps a server's wall clock at run time with libfaketime (an offset file re-read on every call).

    Monotonic clocks stay real (DONT_FAKE_MONOTONIC), as they do when an NTP step hits a real host.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pgwarden-clock-"))
        self.dir.chmod(0o755)  # the server runs as postgres
        self.file = self.dir / "offset"
        self.set(0)

    @property
    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_NO_CACHE": "1",
            "DONT_FAKE_MONOTONIC": "1",
        }

    def set(self, offset_seconds: int) -> None:
        self.file.write_text(f"{offset_seconds:+d}\n")
        self.file.chmod(0o644)


@pytest.fixture
def server_clock() -> Iterator[ServerClock]:
    assert LIBFAKETIME.exists(), "libfaketime is required (apt-get install faketime libfaketime)"
    clock = ServerClock()
    yield clock
    shutil.rmtree(clock.dir, ignore_errors=True)


async def test_a_server_clock_step_acts_on_nothing_for_one_cycle(
    pg_factory: PgFactory, server_clock: ServerClock, request: pytest.FixtureRequest
) -> None:
    """The server's clock jumps 60 s ahead: every idle session looks a minute older. The cycle right after
    acts on nothing and says clockJump; the next one acts on the clock as it now is."""
    server = pg_factory(env=server_clock.env, ledger=True)
    ledger = Ledger(server.logfile)
    app = unique(request)
    victim = server.open_session("idle", application_name=app)
    spec = spec_of(sessions=[{**IDLE_NOW[0], "stateAge": "30s", "applicationNames": [app]}])
    engine = TargetSession(parse_dsn(server.dsn()))
    try:
        before = await engine.run(spec, policy="test")
        assert (before.actions, before.errors) == ([], [])
        server_clock.set(60)
        jumped = await engine.run(spec, policy="test")
        assert jumped.actions == []
        assert len(jumped.errors) == 1
        assert jumped.errors[0].startswith("clockJump: the server's clock moved +60.")
        assert server.alive(victim.pid)
        after = await engine.run(spec, policy="test")
        assert acted(after) == {victim.pid}
        assert after.errors == []
        server_clock.set(0)  # and back: a step either way
        back = await engine.run(spec, policy="test")
        assert back.errors[0].startswith("clockJump: the server's clock moved -60.")
    finally:
        await engine.close()
    ledger.assert_agrees([victim.pid])


async def test_a_small_clock_drift_is_no_jump(
    pg_factory: PgFactory, server_clock: ServerClock, request: pytest.FixtureRequest
) -> None:
    server = pg_factory(env=server_clock.env)
    app = unique(request)
    victim = server.open_session("idle", application_name=app)
    spec = spec_of(sessions=[{**IDLE_NOW[0], "stateAge": "30s", "applicationNames": [app]}])
    engine = TargetSession(parse_dsn(server.dsn()))
    try:
        assert (await engine.run(spec, policy="test")).errors == []
        server_clock.set(4)
        drifted = await engine.run(spec, policy="test")
    finally:
        await engine.close()
    assert drifted.errors == []
    assert server.alive(victim.pid)


# -- the blast radius bounds time, not cycles ----------------------------------------------------------------


def most_in_any_window(times: list[datetime], window: timedelta) -> int:
    """The largest number of `times` inside any half-open window [t, t + window)."""
    ordered = sorted(times)
    return max((sum(1 for u in ordered if t <= u < t + window) for t in ordered), default=0)


async def test_the_blast_radius_bounds_any_window_of_one_interval(
    pg_factory: PgFactory, request: pytest.FixtureRequest
) -> None:
    """A backlog of 12 idle sessions and a feeder adding one every 0.25 s, against `interval: 4s,
    maxActionsPerCycle: 5`, for 10 s of the real loop: by the server's log never more than 5 terminations in
    any 4 s, and the backlog drains at that rate (5 per 4 s, early wake-ups included)."""
    server = pg_factory(ledger=True)
    ledger = Ledger(server.logfile)
    app = unique(request)
    for _ in range(12):
        server.open_session("idle", application_name=app)
    spec = spec_of(
        interval="4s",
        limits={"maxActionsPerCycle": 5, "maxFractionPerCycle": 1.0},
        sessions=[{**IDLE_NOW[0], "applicationNames": [app]}],
    )
    feeding = threading.Event()

    def feed() -> None:
        while not feeding.wait(0.25):  # the producer's pace, not a synchronisation
            server.open_session("idle", application_name=app)

    engine = TargetSession(parse_dsn(server.dsn()))
    reports: list[CycleReport] = []
    stop = asyncio.Event()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        asyncio.get_running_loop().call_later(10.0, stop.set)
        await run_loop(
            functools.partial(engine.run, spec, policy="test"),
            interval=4.0,
            stop=stop,
            on_report=reports.append,
            on_error=lambda exc, _: False,
        )
        engine_pid = (await engine.connection()).info.backend_pid
    finally:
        feeding.set()
        feeder.join()
        await engine.close()
    done = [pid for r in reports for pid in acted(r)]
    ledger.assert_agrees(done, engine_pids={engine_pid})
    terminated = set(ledger.terminated())
    first_signal: dict[int, datetime] = {}
    for sent in ledger.signals():
        if sent.by_pid == engine_pid and sent.pid in terminated:
            first_signal.setdefault(sent.pid, sent.at)
    assert set(first_signal) == terminated
    assert most_in_any_window(list(first_signal.values()), timedelta(seconds=4)) == 5
    assert 10 <= len(terminated) <= 15  # 10 s: windows starting at 0, 4 and 8 s, five each
    assert any(s.reason == SkipReason.MAX_ACTIONS for r in reports for s in r.skipped)


# -- actions never vanish from the audit trail -------------------------------------------------------------


async def test_a_connection_killed_mid_act_still_reports_every_signal(
    pg_factory: PgFactory, request: pytest.FixtureRequest
) -> None:
    """150 idle sessions to terminate; as soon as the server logs the first termination, pgwarden's own
    backend is terminated from outside. The cycle fails, and its error carries the report: every session the
    server logged as terminated is in it, as done; nothing it reports as done is missing from the log."""
    server = pg_factory(ledger=True)
    ledger = Ledger(server.logfile)
    app = unique(request)
    victims = {server.open_session("idle", application_name=app).pid for _ in range(150)}
    spec = spec_of(sessions=[{**IDLE_NOW[0], "applicationNames": [app]}])
    engine = TargetSession(parse_dsn(server.dsn()))
    engine_pid = (await engine.connection()).info.backend_pid
    killer = server.connect(application_name="killer")  # connected beforehand: react within milliseconds

    def kill_on_first_termination() -> None:
        wait_for(ledger.terminated, timeout=30, interval=0.001, message="the first termination in the log")
        killer.execute("SELECT pg_terminate_backend(%s)", (engine_pid,))

    thread = threading.Thread(target=kill_on_first_termination)
    thread.start()
    try:
        with pytest.raises(CycleInterrupted) as caught:
            await engine.run(spec, policy="test")
    finally:
        thread.join()
        killer.close()
        await engine.close()
    report = caught.value.report
    done = acted(report)
    assert 0 < len(done) < len(victims), "the engine's backend must die part way through acting"
    assert all(a.done for a in report.actions)
    assert report.errors[-1] == str(caught.value)
    assert "lost while signalling" in report.errors[-1]
    ledger.wait_effects([engine_pid])
    ledger.wait_effects(done)
    # The one signal in flight when the connection broke may or may not have been delivered; the report
    # names it (skipped with reason error), so the log may hold it, and nothing else beyond `done`.
    in_flight = {s.pid for s in report.skipped if s.reason == SkipReason.FAILED}
    assert len(in_flight) == 1
    logged = set(ledger.terminated()) - {engine_pid}
    assert done <= logged <= done | in_flight
    assert len(ledger.terminated()) == len(logged) + 1  # once each


def test_two_cli_loops_never_signal_each_other(
    pg_factory: PgFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two `pgwarden enforce` processes, `interval: 1s`, an idle rule over every session and no exclude, for
    five cycles each: the server logs no signal at either, only at the application calling itself pgwarden."""
    server = pg_factory(ledger=True)
    ledger = Ledger(server.logfile)
    engine_role, app_role = unique(request, "warden"), unique(request, "app")
    server.create_role(engine_role, grants=GRANTS)
    server.create_role(app_role)
    fake = server.open_session("idle", user=app_role, application_name="pgwarden-fake")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: pgwarden.dev/v1alpha1\nkind: PostgresPolicy\nmetadata: {name: reaper, namespace: default}\n"
        "spec:\n  selector: {matchLabels: {app: postgres}}\n  interval: 1s\n"
        "  sessions: [{name: idle, action: terminate, states: [idle], stateAge: 0s}]\n"
    )
    command = [PGWARDEN, "enforce", "--dsn", server.dsn(user=engine_role), "--policy", str(policy)]
    logs = [tmp_path / f"engine{i}.log" for i in range(2)]
    lines: list[list[dict[str, Any]]] = [[], []]
    with contextlib.ExitStack() as stack:
        errs = [stack.enter_context(log.open("w")) for log in logs]
        procs = [
            stack.enter_context(
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=CODE_UNDER_TEST)
            )
            for err in errs
        ]

        def read(index: int) -> None:
            stdout = procs[index].stdout
            assert stdout is not None
            for line in stdout:
                lines[index].append(json.loads(line))

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
        for reader in readers:
            reader.start()
        try:
            wait_for(lambda: all(len(out) >= 5 for out in lines), timeout=30, message="five cycles of each loop")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc, reader in zip(procs, readers, strict=True):
                try:
                    proc.wait(timeout=10)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                reader.join(timeout=10)
    assert [proc.returncode for proc in procs] == [0, 0], [log.read_text() for log in logs]
    reports = [report for out in lines for report in out]
    assert all(report["errors"] == [] for report in reports)
    assert {a["pid"] for report in reports for a in report["actions"]} == {fake.pid}
    assert [(e.pid, e.user) for e in ledger.effects()] == [(fake.pid, app_role)]
    assert {s.pid for s in ledger.signals()} == {fake.pid}
