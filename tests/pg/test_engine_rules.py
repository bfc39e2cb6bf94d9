"""Session rules against real sessions: every state, age, filter, exclude and built-in protection.

Each test opens its own sessions, runs one engine cycle and then asks pg_stat_activity what is left.
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

import pytest

from pgwarden.engine.connection import connect, parse_dsn, target_of
from pgwarden.engine.cycle import run_cycle
from pgwarden.engine.patterns import anchored_alternation, glob_to_like
from tests.harness.engine import acted, alive, enforce, spec_of, unique, wait_all_gone
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer, wait_for

pytestmark = pytest.mark.pg

STATES = ["idle", "idle in transaction", "idle in transaction (aborted)", "active"]
GAP = 0.4
"""Seconds between an 'old' and a 'new' session; thresholds sit in the middle of it."""


@pytest.mark.parametrize("state", STATES)
async def test_states_filter_selects_exactly_that_state(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest, state: str
) -> None:
    app = unique(request)
    sessions = {s: pg.open_session(s, application_name=app) for s in STATES}  # type: ignore[arg-type]
    spec = spec_of(
        sessions=[
            {"name": "r", "action": "terminate", "states": [state], "connectionAge": "0s", "applicationNames": [app]}
        ]
    )
    report = await enforce(pg, spec)
    target = sessions[state].pid
    assert acted(report) == {target}
    assert report.actions[0].state == state
    assert report.actions[0].done is True
    pg.wait_gone(target)
    assert alive(pg, {s.pid for s in sessions.values()}) == {s.pid for s in sessions.values()} - {target}
    ledger.assert_agrees(acted(report))


async def test_cancel_stops_the_query_and_keeps_the_session(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    busy = pg.open_session("active", application_name=app)
    spec = spec_of(
        sessions=[{"name": "r", "action": "cancel", "states": ["active"], "queryAge": "0s", "applicationNames": [app]}]
    )
    report = await enforce(pg, spec)
    assert [(a.pid, a.action, a.done) for a in report.actions] == [(busy.pid, "cancel", True)]
    wait_for(lambda: pg.state_of(busy.pid) == "idle", message="the cancelled query to end")
    assert pg.alive(busy.pid)
    ledger.assert_agrees(acted(report), action="cancel")


def _age_pair(pg: PgServer, app: str, kind: str) -> tuple[int, int]:
    """Two sessions whose `kind` timestamp differs by GAP seconds: (old pid, new pid)."""
    if kind == "stateAge":
        old = pg.open_session("idle", application_name=app)
        new = pg.open_session("idle", application_name=app)
        time.sleep(GAP)
        new.conn.execute("SELECT 1")  # a new query: state_change moves, backend_start does not
    elif kind == "queryAge":
        old = pg.open_session("active", application_name=app)
        time.sleep(GAP)
        new = pg.open_session("active", application_name=app)
    elif kind == "transactionAge":
        old = pg.open_session("idle in transaction", application_name=app)
        time.sleep(GAP)
        new = pg.open_session("idle in transaction", application_name=app)
    else:
        old = pg.open_session("idle", application_name=app)
        time.sleep(GAP)
        new = pg.open_session("idle", application_name=app)
    return old.pid, new.pid


@pytest.mark.parametrize("kind", ["stateAge", "queryAge", "transactionAge", "connectionAge"])
async def test_each_age_selects_only_sessions_past_it(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest, kind: str
) -> None:
    app = unique(request)
    old, new = _age_pair(pg, app, kind)
    threshold = f"{int(GAP * 1000 / 2)}ms"
    spec = spec_of(sessions=[{"name": "r", "action": "terminate", kind: threshold, "applicationNames": [app]}])
    report = await enforce(pg, spec)
    assert acted(report) == {old}
    ledger.assert_agrees(acted(report))
    assert report.next_deadline is not None
    assert 0 < report.next_deadline <= GAP / 2
    pg.wait_gone(old)
    assert pg.alive(new)


async def test_all_given_ages_must_hold(pg: PgServer, request: pytest.FixtureRequest) -> None:
    """An idle session has no transaction: a rule that also needs transactionAge never selects it."""
    app = unique(request)
    idle = pg.open_session("idle", application_name=app)
    in_tx = pg.open_session("idle in transaction", application_name=app)
    spec = spec_of(
        sessions=[
            {"name": "r", "action": "terminate", "stateAge": "0s", "transactionAge": "0s", "applicationNames": [app]}
        ]
    )
    report = await enforce(pg, spec)
    assert acted(report) == {in_tx.pid}
    pg.wait_gone(in_tx.pid)
    assert pg.alive(idle.pid)


async def test_first_matching_rule_wins(pg: PgServer, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    a = pg.open_session("idle", application_name=app)
    spec = spec_of(
        sessions=[
            {"name": "first", "action": "cancel", "connectionAge": "0s", "applicationNames": [app]},
            {"name": "second", "action": "terminate", "connectionAge": "0s", "applicationNames": [app]},
        ]
    )
    report = await enforce(pg, spec, dry_run=True)
    assert [(x.rule, x.action, x.pid) for x in report.actions] == [("first", "cancel", a.pid)]


async def test_user_filter(pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest) -> None:
    app, role = unique(request), unique(request, "role")
    pg.create_role(role)
    theirs = pg.open_session("idle", user=role, application_name=app)
    mine = pg.open_session("idle", application_name=app)
    spec = spec_of(
        sessions=[
            {
                "name": "r",
                "action": "terminate",
                "connectionAge": "0s",
                "users": [f"{role[:-1]}*"],
                "applicationNames": [app],
            }
        ]
    )
    report = await enforce(pg, spec)
    assert acted(report) == {theirs.pid}
    ledger.assert_agrees(acted(report))
    assert report.actions[0].user == role
    pg.wait_gone(theirs.pid)
    assert pg.alive(mine.pid)


async def test_database_filter(pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest) -> None:
    app, db = unique(request), unique(request, "db")
    pg.create_database(db)
    there = pg.open_session("idle", dbname=db, application_name=app)
    here = pg.open_session("idle", application_name=app)
    spec = spec_of(
        sessions=[
            {"name": "r", "action": "terminate", "connectionAge": "0s", "databases": [db], "applicationNames": [app]}
        ]
    )
    report = await enforce(pg, spec)
    assert acted(report) == {there.pid}
    ledger.assert_agrees(acted(report))
    assert report.actions[0].database == db
    pg.wait_gone(there.pid)
    assert pg.alive(here.pid)


async def test_application_name_globs(pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest) -> None:
    base = unique(request)
    web1 = pg.open_session("idle", application_name=f"{base}-web-1")
    web2 = pg.open_session("idle", application_name=f"{base}-web-22")
    worker = pg.open_session("idle", application_name=f"{base}-worker")
    literal = pg.open_session("idle", application_name=f"{base}-w%b_1")
    spec = spec_of(
        sessions=[
            {
                "name": "r",
                "action": "terminate",
                "connectionAge": "0s",
                "applicationNames": [f"{base}-web-?", f"{base}-[x-z]*"],
            }
        ]
    )
    report = await enforce(pg, spec)
    assert acted(report) == {web1.pid}
    ledger.assert_agrees(acted(report))
    pg.wait_gone(web1.pid)
    assert alive(pg, {web2.pid, worker.pid, literal.pid}) == {web2.pid, worker.pid, literal.pid}


@pytest.mark.parametrize(
    ("cidrs", "tcp", "socket"),
    [
        ([], True, True),
        (["127.0.0.0/8"], True, False),
        (["127.0.0.1"], True, False),
        (["127.0.0.2/32", "10.0.0.0/8"], False, False),
        (["::1/128"], False, False),
    ],
    ids=["empty-matches-all", "cidr", "address", "other-networks", "ipv6"],
)
async def test_client_address_filter_and_unix_sockets(
    pg: PgServer, request: pytest.FixtureRequest, cidrs: list[str], tcp: bool, socket: bool
) -> None:
    app = unique(request)
    over_tcp = pg.open_session("idle", application_name=app)
    over_socket = pg.open_session("idle", application_name=app, via_socket=True)
    assert pg.execute("SELECT client_addr FROM pg_stat_activity WHERE pid = %s", (over_socket.pid,)) == [(None,)]
    spec = spec_of(
        sessions=[
            {
                "name": "r",
                "action": "terminate",
                "connectionAge": "0s",
                "clientAddresses": cidrs,
                "applicationNames": [app],
            }
        ]
    )
    report = await enforce(pg, spec)
    expected = {pid for pid, hit in ((over_tcp.pid, tcp), (over_socket.pid, socket)) if hit}
    assert acted(report) == expected
    wait_all_gone(pg, expected)
    assert alive(pg, {over_tcp.pid, over_socket.pid}) == {over_tcp.pid, over_socket.pid} - expected
    by_pid = {a.pid: a for a in report.actions}
    if socket:
        assert by_pid[over_socket.pid].client_address is None
    if tcp:
        assert by_pid[over_tcp.pid].client_address == "127.0.0.1"


@pytest.mark.parametrize("what", ["users", "databases", "applicationNames"])
async def test_excludes_win_over_rules(pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest, what: str) -> None:
    app, role, db = unique(request), unique(request, "role"), unique(request, "db")
    pg.create_role(role)
    pg.create_database(db)
    protected = pg.open_session("idle", user=role, dbname=db, application_name=f"{app}-keep")
    other = pg.open_session("idle", application_name=f"{app}-go")
    pattern = {"users": role, "databases": db, "applicationNames": f"{app}-k*"}[what]
    spec = spec_of(
        exclude={what: [pattern]},
        sessions=[{"name": "r", "action": "terminate", "connectionAge": "0s", "applicationNames": [f"{app}-*"]}],
    )
    report = await enforce(pg, spec)
    assert acted(report) == {other.pid}
    ledger.assert_agrees(acted(report))
    pg.wait_gone(other.pid)
    assert pg.alive(protected.pid)


async def test_never_the_engines_own_sessions(pg: PgServer, request: pytest.FixtureRequest) -> None:
    """The engine's connection (and any pid it is told to protect) match the rule but are never touched."""
    app = unique(request)
    spare_engine = pg.open_session("idle", application_name=app)  # stands for a second engine connection
    victim = pg.open_session("idle", application_name=app)
    conn = await connect(parse_dsn(pg.dsn(), application_name=app))
    try:
        spec = spec_of(
            sessions=[{"name": "r", "action": "terminate", "connectionAge": "0s", "applicationNames": [app]}]
        )
        report = await run_cycle(conn, spec, policy="test", target=target_of(conn), protected_pids=(spare_engine.pid,))
        assert acted(report) == {victim.pid}
        again = await run_cycle(conn, spec, policy="test", target=target_of(conn), protected_pids=(spare_engine.pid,))
        assert conn.info.backend_pid not in acted(again)
        assert not conn.broken
    finally:
        await conn.close()
    pg.wait_gone(victim.pid)
    assert pg.alive(spare_engine.pid)


INJECTION = "x'; drop table t; --"


async def test_hostile_names_are_matched_literally(pg: PgServer, request: pytest.FixtureRequest) -> None:
    """A user and a database named like an SQL injection are just names: matched exactly, nothing harmed."""
    app = unique(request)
    if not pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (INJECTION,)):
        pg.create_role(INJECTION)
        pg.create_database(INJECTION, owner=INJECTION)
    pg.execute("CREATE TABLE IF NOT EXISTS t (x int)")
    pg.execute("CREATE TABLE IF NOT EXISTS t (x int)", dbname=INJECTION)
    hostile = pg.open_session("idle", user=INJECTION, dbname=INJECTION, application_name=app)
    bystander = pg.open_session("idle", application_name=app)
    spec = spec_of(
        exclude={"applicationNames": [INJECTION], "users": [INJECTION + "x"], "databases": [INJECTION + "x"]},
        sessions=[
            {
                "name": "r",
                "action": "terminate",
                "connectionAge": "0s",
                "users": [INJECTION],
                "databases": [INJECTION],
                "applicationNames": [app, INJECTION],
            }
        ],
        connectionLimits=[{"name": "l", "groupBy": "user", "max": 5, "users": [INJECTION]}],
    )
    report = await enforce(pg, spec)
    assert [(a.pid, a.user, a.database) for a in report.actions] == [(hostile.pid, INJECTION, INJECTION)]
    pg.wait_gone(hostile.pid)
    assert pg.alive(bystander.pid)
    assert pg.execute("SELECT to_regclass('public.t') IS NOT NULL") == [(True,)]
    assert pg.execute("SELECT to_regclass('public.t') IS NOT NULL", dbname=INJECTION) == [(True,)]


async def test_regex_metacharacters_in_names_are_literal(pg: PgServer, request: pytest.FixtureRequest) -> None:
    app, suffix = unique(request), unique(request, "")
    dotted, plain = f"a.b{suffix}", f"axb{suffix}"
    pg.create_role(dotted)
    pg.create_role(plain)
    hit = pg.open_session("idle", user=dotted, application_name=app)
    miss = pg.open_session("idle", user=plain, application_name=app)
    spec = spec_of(
        sessions=[
            {"name": "r", "action": "terminate", "connectionAge": "0s", "users": [dotted], "applicationNames": [app]}
        ]
    )
    report = await enforce(pg, spec)
    assert acted(report) == {hit.pid}
    pg.wait_gone(hit.pid)
    assert pg.alive(miss.pid)


GLOBS = [
    "*",
    "?",
    "a*",
    "*b",
    "a?c",
    "[abc]",
    "[!abc]",
    "[a-c]x",
    "[!a-c]",
    "[]]",
    "[!]]",
    "[a-]",
    "[-a]",
    "[z-a]",
    "[!z-a]",
    "a[",
    "[",
    "[!]",
    "a.b",
    "a+b",
    "(a)",
    "a|b",
    "^a$",
    "a\\b",
    "a{2}",
    "%",
    "_",
    "a%b_c",
    "[%_]",
    "x'; drop",
    "é*",
    "[é]",
    "*.*",
    "[[]",
    "[\\]",
    "[^a]",
    "a-b",
    "[a-c-e]",
]
NAMES = [
    "",
    "a",
    "b",
    "c",
    "x",
    "ab",
    "abc",
    "axc",
    "a.b",
    "axb",
    "a+b",
    "aab",
    "(a)",
    "a|b",
    "^a$",
    "a\\b",
    "aa",
    "a{2}",
    "%",
    "_",
    "a%b_c",
    "aXbYc",
    "]",
    "[",
    "-",
    "z",
    "a[",
    "x'; drop",
    "é",
    "éa",
    "a-b",
    "^",
    "e",
    "d",
    "\\",
]


def test_sql_patterns_mean_what_fnmatch_means(pg: PgServer) -> None:
    """The LIKE and regex forms the observation sends agree with fnmatchcase on every (glob, name) pair."""
    pairs = [(g, n) for g in GLOBS for n in NAMES]
    likes = [glob_to_like(g) for g, _ in pairs]
    regexes = [anchored_alternation([g]) for g, _ in pairs]
    rows = pg.execute(
        "SELECT CASE WHEN x.l IS NOT NULL THEN x.n LIKE x.l END, CASE WHEN x.r IS NOT NULL THEN x.n ~ x.r END"
        " FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS x(n, l, r, i) ORDER BY x.i",
        ([n for _, n in pairs], likes, regexes),
    )
    for (glob, name), (by_like, by_regex) in zip(pairs, rows, strict=True):
        want = fnmatchcase(name, glob)
        if by_like is not None:
            assert by_like == want, (glob, name, "LIKE")
        assert bool(by_regex) == want, (glob, name, "regex")


async def test_engine_connection_is_named_and_bounded(pg: PgServer) -> None:
    conn = await connect(parse_dsn(pg.dsn(options="-c work_mem=8MB")))
    try:
        cur = await conn.execute(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'),"
            " current_setting('lock_timeout'), current_setting('work_mem'), current_setting('search_path')"
        )
        assert await cur.fetchone() == ("pgwarden", "5s", "2s", "8MB", "pg_catalog,pg_temp")
        assert conn.autocommit
    finally:
        await conn.close()
