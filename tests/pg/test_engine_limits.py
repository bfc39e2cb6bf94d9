"""Blast-radius limits, dry run and connection limits against real sessions."""

from __future__ import annotations

import pytest

from pgwarden.policy.api import SkipReason
from tests.harness.engine import acted, alive, enforce, spec_of, unique, wait_all_gone
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer

pytestmark = pytest.mark.pg


def _all_of(app: str) -> list[dict[str, object]]:
    return [{"name": "all", "action": "terminate", "connectionAge": "0s", "applicationNames": [app]}]


async def test_max_actions_per_cycle_holds_when_everything_matches(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    pids = {pg.open_session("idle", application_name=app).pid for _ in range(5)}
    spec = spec_of(limits={"maxActionsPerCycle": 2, "maxFractionPerCycle": 1.0}, sessions=_all_of(app))
    report = await enforce(pg, spec)
    done = acted(report)
    assert len(done) == 2
    assert {s.pid for s in report.skipped} == pids - done
    assert {s.reason for s in report.skipped} == {SkipReason.MAX_ACTIONS}
    wait_all_gone(pg, done)
    assert alive(pg, pids) == pids - done
    # The next cycle takes the next two, and so on: the guard bounds a cycle, not the policy.
    second = await enforce(pg, spec)
    assert len(acted(second)) == 2
    assert not acted(second) & done
    ledger.assert_agrees(done | acted(second))


async def test_max_fraction_per_cycle_rounds_down_but_allows_one(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    pids = {pg.open_session("idle", application_name=app).pid for _ in range(4)}
    spec = spec_of(limits={"maxActionsPerCycle": 100, "maxFractionPerCycle": 0.01}, sessions=_all_of(app))
    report = await enforce(pg, spec)
    clients = report.backends["client backend"]
    assert clients < 100  # so 1% rounds down to 0, and the floor of one action applies
    assert len(report.actions) == 1
    assert {s.reason for s in report.skipped} == {SkipReason.MAX_FRACTION}
    assert len(report.skipped) == 3
    pg.wait_gone(report.actions[0].pid)
    assert len(alive(pg, pids)) == 3
    ledger.assert_agrees(acted(report))


async def test_dry_run_changes_nothing_and_reports_exactly_what_enforce_does(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    app, role = unique(request), unique(request, "role")
    pg.create_role(role)
    sessions = [
        pg.open_session("idle", application_name=app),
        pg.open_session("idle in transaction", application_name=app),
        pg.open_session("idle in transaction (aborted)", user=role, application_name=app),
        pg.open_session("active", application_name=app),
        pg.open_session("idle", user=role, application_name=app),
        pg.open_session("idle", user=role, application_name=app),
    ]
    pids = {s.pid for s in sessions}
    before = pg.execute(
        "SELECT pid, state, state_change FROM pg_stat_activity WHERE pid = ANY(%s) ORDER BY pid", (list(pids),)
    )
    spec = spec_of(
        limits={"maxActionsPerCycle": 3, "maxFractionPerCycle": 1.0},
        sessions=[
            {
                "name": "tx",
                "action": "terminate",
                "states": ["idle in transaction"],
                "stateAge": "0s",
                "applicationNames": [app],
            }
        ],
        connectionLimits=[
            {"name": "per-user", "groupBy": "user", "max": 1, "users": [role], "applicationNames": [app]}
        ],
    )
    dry = await enforce(pg, spec, dry_run=True)
    assert dry.enforcement_action.value == "dryRun"
    assert dry.actions
    assert all(not a.done for a in dry.actions)
    after = pg.execute(
        "SELECT pid, state, state_change FROM pg_stat_activity WHERE pid = ANY(%s) ORDER BY pid", (list(pids),)
    )
    assert after == before  # not a signal, not even a state change

    real = await enforce(pg, spec)
    assert [(a.rule, a.pid) for a in real.actions] == [(a.rule, a.pid) for a in dry.actions]
    assert [(s.rule, s.pid, s.reason) for s in real.skipped] == [(s.rule, s.pid, s.reason) for s in dry.skipped]
    assert all(a.done for a in real.actions)
    wait_all_gone(pg, acted(real))
    assert alive(pg, pids) == pids - acted(real)


async def test_dry_run_from_the_spec(pg: PgServer, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    victim = pg.open_session("idle", application_name=app)
    report = await enforce(pg, spec_of(enforcementAction="dryRun", sessions=_all_of(app)))
    assert [(a.pid, a.done) for a in report.actions] == [(victim.pid, False)]
    assert report.to_json()["enforcementAction"] == "dryRun"
    assert pg.alive(victim.pid)


async def test_connection_limit_terminates_idle_first_longest_idle_first(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    app, role = unique(request), unique(request, "role")
    pg.create_role(role)

    def open_(state: str) -> int:
        return pg.open_session(state, user=role, application_name=app).pid  # type: ignore[arg-type]

    idle_oldest, idle_newer = open_("idle"), open_("idle")
    in_tx, aborted = open_("idle in transaction"), open_("idle in transaction (aborted)")
    busy1, busy2 = open_("active"), open_("active")
    everyone = {idle_oldest, idle_newer, in_tx, aborted, busy1, busy2}
    bystander = pg.open_session("idle", application_name=app).pid  # another user: another group

    spec = spec_of(connectionLimits=[{"name": "per-user", "groupBy": "user", "max": 3, "applicationNames": [app]}])
    report = await enforce(pg, spec)
    assert [a.pid for a in report.actions] == [idle_oldest, idle_newer, aborted]
    assert {a.rule for a in report.actions} == {"per-user"}
    wait_all_gone(pg, acted(report))
    assert alive(pg, everyone | {bystander}) == {in_tx, busy1, busy2, bystander}

    # Over the cap with only active sessions left eligible: left alone unless includeActive.
    spec = spec_of(connectionLimits=[{"name": "per-user", "groupBy": "user", "max": 1, "applicationNames": [app]}])
    report = await enforce(pg, spec)
    assert [a.pid for a in report.actions] == [in_tx]
    pg.wait_gone(in_tx)
    assert not (await enforce(pg, spec)).actions
    spec = spec_of(
        connectionLimits=[
            {"name": "per-user", "groupBy": "user", "max": 1, "applicationNames": [app], "includeActive": True}
        ]
    )
    report = await enforce(pg, spec)
    assert [a.pid for a in report.actions] == [busy1]  # the longer-running one
    pg.wait_gone(busy1)
    assert alive(pg, {busy2, bystander}) == {busy2, bystander}


@pytest.mark.parametrize("group_by", ["database", "applicationName", "clientAddress"])
async def test_connection_limit_groups(
    pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest, group_by: str
) -> None:
    base, db = unique(request), unique(request, "db")
    if group_by == "database":
        pg.create_database(db)
        big = [pg.open_session("idle", dbname=db, application_name=base).pid for _ in range(3)]
        small = [pg.open_session("idle", application_name=base).pid]
        scope = {"applicationNames": [base]}
    elif group_by == "applicationName":
        big = [pg.open_session("idle", application_name=f"{base}-a").pid for _ in range(3)]
        small = [pg.open_session("idle", application_name=f"{base}-b").pid]
        scope = {"applicationNames": [f"{base}-*"]}
    else:  # Unix-socket sessions have no address and form one group of their own
        big = [pg.open_session("idle", application_name=base, via_socket=True).pid for _ in range(3)]
        small = [pg.open_session("idle", application_name=base).pid]
        scope = {"applicationNames": [base]}
    spec = spec_of(connectionLimits=[{"name": "cap", "groupBy": group_by, "max": 1, **scope}])
    report = await enforce(pg, spec)
    assert [a.pid for a in report.actions] == big[:2]
    wait_all_gone(pg, big[:2])
    assert alive(pg, big + small) == {big[2], *small}
    ledger.assert_agrees(acted(report))


async def test_session_rules_go_first_and_count_toward_connection_limits(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    """A session a rule terminates no longer counts in its group, so the limit takes only what is left over."""
    app = unique(request)
    in_tx = pg.open_session("idle in transaction", application_name=app).pid
    idle = [pg.open_session("idle", application_name=app).pid for _ in range(3)]
    spec = spec_of(
        sessions=[
            {
                "name": "tx",
                "action": "terminate",
                "states": ["idle in transaction"],
                "stateAge": "0s",
                "applicationNames": [app],
            }
        ],
        connectionLimits=[{"name": "cap", "groupBy": "applicationName", "max": 2, "applicationNames": [app]}],
    )
    report = await enforce(pg, spec)
    assert [(a.rule, a.pid) for a in report.actions] == [("tx", in_tx), ("cap", idle[0])]
    wait_all_gone(pg, acted(report))
    assert alive(pg, idle) == set(idle[1:])
