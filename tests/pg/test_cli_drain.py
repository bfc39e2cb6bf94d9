"""`pgwarden drain` end to end: the console script as a subprocess against a real server, judged by its log.

Every test compares the report with the server's own account (`tests.harness.ledger`): the pids drain
says it terminated are exactly the backends that logged their termination, and no signalling statement
aimed at anything else.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgwarden.engine.drain import BLAST_RADIUS_NOTE, STEP_BOUND_SECONDS
from tests.harness.cli import CODE_UNDER_TEST, PGWARDEN
from tests.harness.engine import unique
from tests.harness.faults import Relay
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer, SessionState, free_port, wait_for

pytestmark = pytest.mark.pg

SHOP = "shop"
REPORT_KEYS = [
    "database",
    "target",
    "serverVersion",
    "enforcementAction",
    "drained",
    "timedOut",
    "rounds",
    "timeoutSeconds",
    "actions",
    "skipped",
    "survivors",
    "untouched",
    "errors",
    "notes",
]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGWARDEN, "drain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=CODE_UNDER_TEST,
    )


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    report: dict[str, Any] = json.loads(lines[0])
    assert list(report) == REPORT_KEYS
    assert report["notes"] == [BLAST_RADIUS_NOTE]
    return report


@pytest.fixture
def shop(pg: PgServer) -> str:
    """Database `shop` on the shared server (created once), with no client session left from earlier."""
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (SHOP,)):
        pg.create_database(SHOP)
    # An earlier test's sessions are closed at its teardown; their backends exit a moment later.
    wait_for(lambda: not on_shop(pg), message="the sessions of earlier tests to leave shop")
    return SHOP


def untouched(report: dict[str, Any]) -> list[tuple[int, str | None, str]]:
    """The client sessions drain left alone: (pid, user, reason). Other backends (an autovacuum worker
    passing through the database) are listed in the report too, but come and go on their own."""
    return [(u["pid"], u["user"], u["reason"]) for u in report["untouched"] if u["backendType"] == "client backend"]


def on_shop(pg: PgServer) -> set[int]:
    rows = pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'", (SHOP,)
    )
    return {r[0] for r in rows}


def engine_pids(ledger: Ledger, user: str = "postgres") -> set[int]:
    """Backends of pgwarden's engine connections (its role, application_name pgwarden) in the log."""
    return {e.pid for e in ledger.entries() if e.application == "pgwarden" and e.user == user}


def assert_signalled_exactly(ledger: Ledger, pids: set[int]) -> None:
    """The log shows exactly `pids` terminated, and drain's statements aimed at nothing else."""
    ledger.assert_agrees(pids)
    aimed = {s.pid for s in ledger.signals()}
    assert aimed <= pids, f"signalled beyond the report: {sorted(aimed - pids)}"
    assert {s.by_application for s in ledger.signals()} <= {"pgwarden"}


class Reconnector:
    """A client that keeps a session on `shop` busy and reconnects each time it is terminated.

    `times`: how many times it reconnects before giving up (None: until stopped). Every pid it held is
    kept, in order. The session runs pg_sleep, so it notices its termination at once; stop() cancels it.
    """

    def __init__(self, pg: PgServer, app: str, times: int | None) -> None:
        self.dsn = pg.dsn(dbname=SHOP, application_name=app)
        self.times = times
        self.pids: list[int] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.conn: psycopg.Connection[Any] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        connections = 0
        while not self.stopping.is_set() and (self.times is None or connections <= self.times):
            connections += 1
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                with self.lock:
                    self.conn = conn
                    self.pids.append(conn.info.backend_pid)
                    if self.stopping.is_set():
                        return
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_sleep(600)")

    def wait_connected(self, count: int = 1) -> None:
        wait_for(lambda: len(self.pids) >= count, message=f"the reconnecting client's connection {count}")

    def stop(self) -> None:
        """Cancel the running pg_sleep until the thread ends (a cancel sent before the sleep began is lost)."""
        self.stopping.set()
        deadline = time.monotonic() + 15
        while self.thread.is_alive() and time.monotonic() < deadline:
            with self.lock:
                conn = self.conn
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.cancel_safe(timeout=5)
            self.thread.join(timeout=0.2)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def reconnecting(pg: PgServer, app: str, times: int | None) -> Iterator[Reconnector]:
    client = Reconnector(pg, app, times)
    try:
        client.wait_connected()
        yield client
    finally:
        client.stop()


def test_drains_every_session_on_the_database_and_nothing_else(pg: PgServer, shop: str, ledger: Ledger) -> None:
    idle: list[SessionState] = ["idle"] * 14
    open_transaction: list[SessionState] = ["idle in transaction"] * 3
    active: list[SessionState] = ["active"] * 3
    states = idle + open_transaction + active
    victims = [pg.open_session(state, dbname=shop, application_name=f"web-{i}") for i, state in enumerate(states)]
    elsewhere = [pg.open_session("idle", dbname="postgres", application_name="other-db") for _ in range(3)]
    result = run("--dsn", pg.dsn(), "--database", shop)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["database"] == shop
    assert report["target"] == f"{pg.host}:{pg.port}"
    assert report["enforcementAction"] == "enforce"
    assert report["drained"] is True
    assert report["timedOut"] is False
    assert report["rounds"] >= 1
    assert report["survivors"] == []
    assert untouched(report) == []
    assert report["errors"] == []
    assert all(a["rule"] == "drain" and a["action"] == "terminate" and a["done"] for a in report["actions"])
    assert all(a["database"] == shop for a in report["actions"])
    terminated = [a["pid"] for a in report["actions"]]
    assert sorted(terminated) == sorted(v.pid for v in victims)  # each once: no session signalled twice
    assert on_shop(pg) == set()
    assert all(pg.alive(s.pid) for s in elsewhere)
    assert_signalled_exactly(ledger, set(terminated))


def test_repeats_rounds_while_a_client_reconnects(pg: PgServer, shop: str, ledger: Ledger) -> None:
    steady = [pg.open_session("idle", dbname=shop, application_name="steady") for _ in range(3)]
    with reconnecting(pg, "comes-back", times=3) as client:
        result = run("--dsn", pg.dsn(), "--database", shop, "--timeout", "30s")
        assert result.returncode == 0, result.stderr
        report = report_of(result)
        client.thread.join(timeout=15)
        held = list(client.pids)
    assert report["drained"] is True
    terminated = [a["pid"] for a in report["actions"]]
    # The client connected 4 times; each of its backends was terminated by its own later round.
    assert len(held) == 4
    assert sorted(terminated) == sorted(held + [s.pid for s in steady])
    assert report["rounds"] >= 4
    assert on_shop(pg) == set()
    assert_signalled_exactly(ledger, set(terminated))


def test_excluded_user_survives_and_is_listed(
    pg: PgServer, shop: str, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    keeper = unique(request, "keeper")
    pg.create_role(keeper)
    kept = pg.open_session("idle", user=keeper, dbname=shop, application_name="reports")
    victims = [pg.open_session("idle", dbname=shop, application_name="web") for _ in range(4)]
    result = run("--dsn", pg.dsn(), "--database", shop, "--exclude-user", keeper, "--exclude-user", "nobody-*")
    # Drained: no session drain may terminate is left; the excluded one is listed apart, with the reason.
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["drained"] is True
    assert sorted(a["pid"] for a in report["actions"]) == sorted(v.pid for v in victims)
    assert report["survivors"] == []
    assert untouched(report) == [(kept.pid, keeper, "excluded")]
    assert on_shop(pg) == {kept.pid}
    assert_signalled_exactly(ledger, {v.pid for v in victims})


def test_never_signals_pgwarden_sessions(
    pg: PgServer, shop: str, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    """Drain's own connection (here on the drained database itself) and another pgwarden process's session
    (the engine's role, application pgwarden-…) are never signalled; a session of another role that only
    calls itself pgwarden is terminated like any other."""
    impostor = unique(request, "impostor")
    pg.create_role(impostor)
    other_pgwarden = pg.open_session("idle", dbname=shop, application_name="pgwarden-sidecar")
    fake = pg.open_session("idle", user=impostor, dbname=shop, application_name="pgwarden")
    result = run("--dsn", pg.dsn(dbname=shop), "--database", shop)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert [a["pid"] for a in report["actions"]] == [fake.pid]
    assert untouched(report) == [(other_pgwarden.pid, "postgres", "pgwarden")]
    assert pg.alive(other_pgwarden.pid)
    assert_signalled_exactly(ledger, {fake.pid})
    own = engine_pids(ledger)
    assert own, "the log shows drain's own connection"
    assert not own & {s.pid for s in ledger.signals()}


def test_sessions_the_role_may_not_signal_are_listed_not_tried(
    pg: PgServer, shop: str, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    """A non-superuser drain role with the two grants: a superuser's session is notPermitted (PostgreSQL would
    refuse), listed apart and never tried; the database still counts as drained."""
    drainer, app = unique(request, "drainer"), unique(request, "app")
    pg.create_role(drainer, grants=("pg_read_all_stats", "pg_signal_backend"))
    pg.create_role(app)
    superuser = pg.open_session("idle", dbname=shop, application_name="admin")
    victim = pg.open_session("idle", user=app, dbname=shop, application_name="web")
    result = run("--dsn", pg.dsn(user=drainer), "--database", shop)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["drained"] is True
    assert [a["pid"] for a in report["actions"]] == [victim.pid]
    assert untouched(report) == [(superuser.pid, "postgres", "notPermitted")]
    assert [(s["pid"], s["reason"]) for s in report["skipped"]] == [(superuser.pid, "notPermitted")]
    assert report["errors"] == []
    assert pg.alive(superuser.pid)
    assert_signalled_exactly(ledger, {victim.pid})


def test_without_grants_the_hidden_sessions_are_listed_and_the_grant_named(
    pg: PgServer, shop: str, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    """Without pg_read_all_stats other roles' sessions are hidden: listed as notVisible, never signalled, and
    `errors` names the missing grants; the role's own sessions are still drained."""
    weak = unique(request, "weak")
    pg.create_role(weak)
    hidden = pg.open_session("idle", dbname=shop, application_name="admin")
    mine = pg.open_session("idle", user=weak, dbname=shop, application_name="web")
    result = run("--dsn", pg.dsn(user=weak), "--database", shop)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert [a["pid"] for a in report["actions"]] == [mine.pid]
    hidden_entries = [(u["pid"], u["reason"]) for u in report["untouched"] if u["pid"] == hidden.pid]
    assert hidden_entries == [(hidden.pid, "notVisible")]
    assert any("lacks pg_read_all_stats" in e for e in report["errors"])
    assert any("lacks pg_signal_backend" in e for e in report["errors"])
    assert pg.alive(hidden.pid)
    assert_signalled_exactly(ledger, {mine.pid})


def test_timeout_with_a_client_that_keeps_reconnecting_exits_4(pg: PgServer, shop: str, ledger: Ledger) -> None:
    with reconnecting(pg, "never-gives-up", times=None) as client:
        result = run("--dsn", pg.dsn(), "--database", shop, "--timeout", "2s")
        assert result.returncode == 4, result.stderr
        report = report_of(result)
        held = set(client.pids)
    assert report["drained"] is False
    assert report["timedOut"] is True
    assert report["timeoutSeconds"] == 2.0
    assert report["rounds"] >= 2
    survivors = report["survivors"]
    assert survivors, "the survivors are listed"
    assert {s["pid"] for s in survivors} <= held
    assert all(s["applicationName"] == "never-gives-up" and s["database"] == shop for s in survivors)
    terminated = {a["pid"] for a in report["actions"]}
    assert terminated <= held
    assert_signalled_exactly(ledger, terminated)


def test_a_connection_lost_mid_drain_prints_what_was_done_and_exits_3(pg: PgServer, shop: str, ledger: Ledger) -> None:
    with reconnecting(pg, "keeps-coming", times=None) as client:
        proc = subprocess.Popen(
            [PGWARDEN, "drain", "--dsn", pg.dsn(), "--database", shop, "--timeout", "60s"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CODE_UNDER_TEST,
        )
        try:
            wait_for(lambda: ledger.terminated(), timeout=20, message="drain's first termination")
            (drainer,) = engine_pids(ledger)
            pg.execute("SELECT pg_terminate_backend(%s)", (drainer,))
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        held = set(client.pids)
    assert proc.returncode == 3, stderr
    report = json.loads(stdout)
    assert report["drained"] is False
    assert report["timedOut"] is False
    assert report["actions"], "the terminations before the loss are reported"
    assert report["errors"]
    reported = {a["pid"] for a in report["actions"]}
    assert reported <= held
    ledger.wait_effects(reported)
    # Nothing outside the client was hit (a signal in flight at the loss may be missing from the report).
    assert set(ledger.terminated()) - {drainer} <= held


def test_a_server_going_silent_mid_drain_is_cut_at_the_bound(pg: PgServer, shop: str, ledger: Ledger) -> None:
    """A server that stops answering (a blackhole: the peer's TCP stack looks alive) honours no
    statement_timeout: drain shuts its connection down after STEP_BOUND_SECONDS and exits 3 with what it did."""
    host = "127.0.200.46"
    dsn = f"host={host} port={{}} user=postgres dbname=postgres"
    with Relay(host, free_port(host), (pg.host, pg.port)) as relay, reconnecting(pg, "keeps-coming", times=None):
        proc = subprocess.Popen(
            [PGWARDEN, "drain", "--dsn", dsn.format(relay.port), "--database", shop, "--timeout", "120s"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CODE_UNDER_TEST,
        )
        try:
            wait_for(lambda: ledger.terminated(), timeout=20, message="drain's first termination")
            relay.set_mode("blackhole")
            stdout, stderr = proc.communicate(timeout=STEP_BOUND_SECONDS + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 3, stderr
    assert f"did not answer within {STEP_BOUND_SECONDS:g} s" in stderr
    report = json.loads(stdout)
    assert report["actions"], "the terminations before the silence are reported"
    assert report["timedOut"] is False


def test_dry_run_signals_nothing_and_lists_what_it_would_terminate(pg: PgServer, shop: str, ledger: Ledger) -> None:
    victims = [pg.open_session("idle", dbname=shop, application_name="web") for _ in range(5)]
    own = pg.open_session("idle", dbname=shop, application_name="pgwarden-other")
    result = run("--dsn", pg.dsn(), "--database", shop, "--dry-run")
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["enforcementAction"] == "dryRun"
    assert report["rounds"] == 0
    assert sorted((a["pid"], a["done"]) for a in report["actions"]) == sorted((v.pid, False) for v in victims)
    assert untouched(report) == [(own.pid, "postgres", "pgwarden")]
    assert report["survivors"] == []
    assert on_shop(pg) == {v.pid for v in victims} | {own.pid}
    assert ledger.signals() == []
    assert ledger.terminated() == []


def test_text_output(pg: PgServer, shop: str) -> None:
    victim = pg.open_session("idle", dbname=shop, application_name="web")
    result = run("--dsn", pg.dsn(), "--database", shop, "--output", "text")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"drain {shop}  target {pg.host}:{pg.port}  PostgreSQL {pg.major}.")
    assert "drained in 1 round(s)" in result.stdout
    assert BLAST_RADIUS_NOTE in result.stdout
    assert str(victim.pid) in result.stdout


def test_a_database_that_does_not_exist_exits_2(pg: PgServer, ledger: Ledger) -> None:
    result = run("--dsn", pg.dsn(), "--database", "no_such_db")
    assert result.returncode == 2
    assert result.stdout == ""
    assert 'database "no_such_db" does not exist' in result.stderr
    assert ledger.signals() == []


def test_a_name_is_not_a_pattern(pg: PgServer, shop: str, ledger: Ledger) -> None:
    """`--database 'sho?'` names a database called `sho?`, which does not exist: shop is left alone."""
    victim = pg.open_session("idle", dbname=shop, application_name="web")
    result = run("--dsn", pg.dsn(), "--database", "sho?")
    assert result.returncode == 2
    assert pg.alive(victim.pid)
    assert ledger.signals() == []


def test_a_name_with_pattern_characters_means_that_database_only(pg: PgServer, shop: str, ledger: Ledger) -> None:
    """`sh_p%*` is a database of its own: read as LIKE or glob it would also name shop."""
    odd = "sh_p%*"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (odd,)):
        pg.create_database(odd)
    bystander = pg.open_session("idle", dbname=shop, application_name="web")
    victim = pg.open_session("idle", dbname=odd, application_name="web")
    result = run("--dsn", pg.dsn(), "--database", odd)
    assert result.returncode == 0, result.stderr
    assert [a["pid"] for a in report_of(result)["actions"]] == [victim.pid]
    assert pg.alive(bystander.pid)
    assert_signalled_exactly(ledger, {victim.pid})


def test_unreachable_server_exits_3_without_the_password() -> None:
    port = free_port()
    dsn = f"host=127.0.0.1 port={port} user=postgres password=hunter2-secret dbname=postgres"
    started = time.monotonic()
    result = run("--dsn", dsn, "--database", SHOP, timeout=30)
    assert result.returncode == 3
    assert time.monotonic() - started < 5 + 3  # connect_timeout, plus interpreter start-up
    assert result.stdout == ""
    assert f"127.0.0.1:{port}" in result.stderr
    assert "hunter2-secret" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--database", SHOP, "--timeout", "soon"], "--timeout: invalid duration 'soon'"),
        (["--database", SHOP, "--timeout=-5s"], "--timeout: must not be negative"),
        (["--database", ""], "--database: must name a database"),
        (["--database", SHOP, "--exclude-user", ""], "--exclude-user: must not be empty"),
        ([], "the following arguments are required: --database"),
    ],
)
def test_usage_errors_exit_2_before_connecting(pg: PgServer, ledger: Ledger, args: list[str], message: str) -> None:
    result = run("--dsn", pg.dsn(), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert not engine_pids(ledger), "nothing connected"


def test_bad_dsn_exits_2_without_echoing_it() -> None:
    result = run("--dsn", "host=x password='unterminated-secret", "--database", SHOP)
    assert result.returncode == 2
    assert "--dsn is not a valid connection string" in result.stderr
    assert "unterminated-secret" not in result.stderr
