"""The decision step as pure functions: rule order, protections, connection limits, blast radius."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pgwarden.engine.decide import (
    ClockMark,
    RuleMatcher,
    allowed_actions,
    clock_step,
    in_scope,
    is_protected,
    limit_victims,
    plan,
    rule_matches,
    victim_order,
)
from pgwarden.engine.types import ObservedSession
from pgwarden.policy.api import SkipReason
from pgwarden.policy.model import ConnectionLimit, Exclude, Limits, SessionRule
from tests.harness.observations import observation, session, spec


def rule(**fields: Any) -> SessionRule:
    return SessionRule.model_validate({"name": "r", "action": "terminate", **fields})


# -- matching --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "s", "expected"),
    [
        ({"stateAge": "1m"}, session(age=61), True),
        ({"stateAge": "1m"}, session(age=59), False),
        ({"stateAge": "1m"}, session(age=60), True),  # reaching the threshold is crossing it
        ({"states": ["idle"], "stateAge": "0s"}, session("active"), False),
        ({"states": ["idle", "active"], "stateAge": "0s"}, session("active"), True),
        ({"transactionAge": "0s"}, session(xact_age=None), False),  # no transaction: never
        ({"transactionAge": "5s", "stateAge": "1s"}, session(age=2, xact_age=6), True),
        ({"transactionAge": "5s", "stateAge": "3s"}, session(age=2, xact_age=6), False),  # all must hold
        ({"queryAge": "1m"}, session(query_age=120), True),
        ({"connectionAge": "1h"}, session(connection_age=3599), False),
        ({"stateAge": "0s", "users": ["ap?"]}, session(user="app"), True),
        ({"stateAge": "0s", "users": ["ap?"]}, session(user="apps"), False),
        ({"stateAge": "0s", "users": ["app"]}, session(user=None), False),
        ({"stateAge": "0s", "databases": ["sh*", "x"]}, session(database="shop"), True),
        ({"stateAge": "0s", "applicationNames": ["[!w]*"]}, session(app="web"), False),
        ({"stateAge": "0s", "applicationNames": ["WEB"]}, session(app="web"), False),  # case-sensitive
        ({"stateAge": "0s", "clientAddresses": ["10.0.0.0/8"]}, session(addr="10.1.2.3"), True),
        ({"stateAge": "0s", "clientAddresses": ["10.0.0.0/8"]}, session(addr=None), False),  # Unix socket
        ({"stateAge": "0s", "clientAddresses": []}, session(addr=None), True),
        ({"stateAge": "0s", "clientAddresses": ["fd00::/8"]}, session(addr="fd00::1"), True),
        ({"stateAge": "0s", "clientAddresses": ["fd00::/8"]}, session(addr="10.0.0.1"), False),
        ({"stateAge": "0s"}, session(state=None, age=None), False),
    ],
)
def test_rule_matches(fields: dict[str, Any], s: ObservedSession, expected: bool) -> None:
    assert rule_matches(rule(**fields), s) is expected


def test_first_matching_rule_wins_and_order_within_a_rule_is_worst_first() -> None:
    a, b, c = session(age=100), session(age=300), session("active", age=50)
    result = plan(
        observation(a, b, c),
        spec(
            sessions=[
                {"name": "busy", "action": "cancel", "states": ["active"], "queryAge": "10s"},
                {"name": "any", "action": "terminate", "stateAge": "10s"},
            ]
        ),
    )
    assert [(p.rule, p.action.value, p.session.pid) for p in result.actions] == [
        ("busy", "cancel", c.pid),
        ("any", "terminate", b.pid),  # 300 s past: before the one 100 s past
        ("any", "terminate", a.pid),
    ]


# -- protections ---------------------------------------------------------------------------------------


def test_only_client_backends_are_candidates() -> None:
    everything = spec(sessions=[{"name": "all", "action": "terminate", "connectionAge": "0s"}])
    kinds = ["walsender", "autovacuum worker", "background worker", "parallel worker", "checkpointer"]
    others = [session(backend_type=k) for k in kinds]
    client = session()
    result = plan(observation(client, *others), everything)
    assert [p.session.pid for p in result.actions] == [client.pid]


def test_own_and_protected_pids_are_never_candidates() -> None:
    own, spare, other = session(pid=1), session(pid=2), session(pid=3)
    everything = spec(sessions=[{"name": "all", "action": "terminate", "connectionAge": "0s"}])
    result = plan(observation(own, spare, other), everything, protected_pids={2})
    assert [p.session.pid for p in result.actions] == [3]


@pytest.mark.parametrize(
    ("exclude", "s", "protected"),
    [
        ({"users": ["postgres"]}, session(user="postgres"), True),
        ({"users": ["post*"]}, session(user="app"), False),
        ({"databases": ["shop"]}, session(database="shop"), True),
        ({"applicationNames": ["pgwarden*"]}, session(app="pgwarden-sidecar"), True),
        ({"users": ["x"]}, session(user=None), True),  # cannot be checked: left alone
        ({}, session(user=None), False),
    ],
)
def test_excludes(exclude: dict[str, list[str]], s: ObservedSession, protected: bool) -> None:
    assert is_protected(s, Exclude.model_validate(exclude), ()) is protected


# -- connection limits ---------------------------------------------------------------------------------


def limit(**fields: Any) -> ConnectionLimit:
    return ConnectionLimit.model_validate({"name": "cap", "groupBy": "user", "max": 1, **fields})


def test_victims_idle_first_longest_idle_first_active_only_if_asked() -> None:
    idle_new, idle_old = session("idle", age=5), session("idle", age=50)
    in_tx, aborted = session("idle in transaction", age=500), session("idle in transaction (aborted)", age=1)
    busy_old, busy_new = session("active", age=900), session("active", age=2)
    group = [idle_new, idle_old, in_tx, aborted, busy_old, busy_new]
    order = sorted(group, key=victim_order)
    assert order == [idle_old, idle_new, aborted, in_tx, busy_old, busy_new]
    assert limit_victims(limit(max=1), group, taken=()) == [idle_old, idle_new, aborted, in_tx]
    assert limit_victims(limit(max=1, includeActive=True), group, taken=()) == [
        idle_old,
        idle_new,
        aborted,
        in_tx,
        busy_old,
    ]
    assert limit_victims(limit(max=4), group, taken=()) == [idle_old, idle_new]
    assert limit_victims(limit(max=6), group, taken=()) == []
    # Sessions a rule already takes no longer count, and are not chosen twice.
    assert limit_victims(limit(max=4), group, taken={idle_old.pid}) == [idle_new]


def test_groups_and_scope() -> None:
    a1, a2, b1 = session(user="a"), session(user="a"), session(user="b")
    local1, local2 = session(addr=None), session(addr=None)
    assert limit_victims(limit(max=1), [a1, a2, b1], taken=()) == [a1]
    assert limit_victims(limit(max=1, users=["b"]), [a1, a2, b1], taken=()) == []
    assert limit_victims(limit(max=1, groupBy="clientAddress"), [local1, local2], taken=()) == [local1]
    assert in_scope(local1, limit(clientAddresses=["10.0.0.0/8"])) is False


def test_rules_then_limits_then_blast_radius() -> None:
    tx = session("idle in transaction", age=100, xact_age=100)
    idle = [session(age=a) for a in (1, 2, 3)]
    s = spec(
        sessions=[{"name": "tx", "action": "terminate", "states": ["idle in transaction"], "stateAge": "10s"}],
        connectionLimits=[{"name": "cap", "groupBy": "user", "max": 2}],
    )
    result = plan(observation(tx, *idle), s)
    # Four sessions of one user, cap 2: the rule takes one, the limit one more (the longest idle).
    assert [(p.rule, p.session.pid) for p in result.actions] == [("tx", tx.pid), ("cap", idle[2].pid)]


# -- blast radius ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_actions", "fraction", "clients", "expected"),
    [
        (50, 0.5, 1000, (50, SkipReason.MAX_ACTIONS)),
        (50, 0.5, 40, (20, SkipReason.MAX_FRACTION)),
        (50, 0.5, 3, (1, SkipReason.MAX_FRACTION)),  # 1.5 rounds down to 1
        (50, 0.1, 5, (1, SkipReason.MAX_FRACTION)),  # 0.5 rounds down to 0, but one action is always allowed
        (50, 0.29, 100, (29, SkipReason.MAX_FRACTION)),  # no float surprise (0.29 * 100 = 28.999...)
        (1, 1.0, 0, (1, SkipReason.MAX_ACTIONS)),
        (10, 1.0, 10, (10, SkipReason.MAX_ACTIONS)),
    ],
)
def test_allowed_actions(max_actions: int, fraction: float, clients: int, expected: tuple[int, str]) -> None:
    limits = Limits(max_actions_per_cycle=max_actions, max_fraction_per_cycle=fraction)
    assert allowed_actions(limits, clients) == expected


def test_blast_radius_holds_when_everything_matches() -> None:
    sessions = [session(age=float(i)) for i in range(1, 11)]
    s = spec(
        limits={"maxActionsPerCycle": 3, "maxFractionPerCycle": 1.0},
        sessions=[{"name": "all", "action": "terminate", "connectionAge": "0s"}],
    )
    result = plan(observation(*sessions), s)
    assert len(result.actions) == 3
    assert [x.reason for x in result.skipped] == [SkipReason.MAX_ACTIONS] * 7
    assert {p.session.pid for p in result.actions} | {x.pid for x in result.skipped} == {x.pid for x in sessions}


def test_next_deadline_comes_from_the_observation() -> None:
    assert plan(observation(next_crossing=12.5), spec()).next_deadline == 12.5
    assert plan(observation(), spec()).next_deadline is None


def test_pgwardens_own_sessions_in_any_process_are_never_candidates() -> None:
    """The engine's role with a pgwarden application name is pgwarden; another role so named is not."""
    policy = spec(sessions=[{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "0s"}])
    other_replica = session(user="warden", app="pgwarden")
    sidecar = session(user="warden", app="pgwarden-sidecar")
    impostor = session(user="app", app="pgwarden-fake")
    same_role_app = session(user="warden", app="psql")
    decided = plan(observation(other_replica, sidecar, impostor, same_role_app), policy)
    assert {p.session.pid for p in decided.actions} == {impostor.pid, same_role_app.pid}
    assert decided.skipped == ()


def test_sessions_not_permitted_are_skipped_and_use_no_budget() -> None:
    policy = spec(
        limits={"maxActionsPerCycle": 2, "maxFractionPerCycle": 1.0},
        sessions=[{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "0s"}],
    )
    supers = [session(user="postgres", age=1000.0, superuser=True, permitted=False) for _ in range(3)]
    apps = [session(age=10.0) for _ in range(3)]
    decided = plan(observation(*supers, *apps), policy)
    assert [p.session.pid for p in decided.actions] == [apps[0].pid, apps[1].pid]
    assert [p.session.pid for p in decided.reserve] == [apps[2].pid]
    assert sorted((s.pid, s.reason) for s in decided.skipped) == sorted(
        [*((s.pid, SkipReason.NOT_PERMITTED) for s in supers), (apps[2].pid, SkipReason.MAX_ACTIONS)]
    )


def test_sessions_not_permitted_do_not_count_in_connection_limits() -> None:
    policy = spec(connectionLimits=[{"name": "cap", "groupBy": "user", "max": 1}])
    supers = [session(user="app", superuser=True, permitted=False) for _ in range(2)]
    mine = [session(user="app") for _ in range(2)]
    decided = plan(observation(*supers, *mine), policy)
    assert len(decided.actions) == 1
    assert decided.actions[0].session.pid in {s.pid for s in mine}


def test_clock_step_is_the_server_clock_against_the_monotonic_one() -> None:
    first = ClockMark(server=1_000_000.0, local=50.0)
    assert clock_step(None, first) == 0.0
    assert clock_step(first, ClockMark(server=1_000_030.0, local=80.0)) == pytest.approx(0.0)  # 30 s passed
    assert clock_step(first, ClockMark(server=1_000_070.0, local=60.0)) == pytest.approx(60.0)  # stepped ahead
    assert clock_step(first, ClockMark(server=999_990.0, local=60.0)) == pytest.approx(-20.0)  # stepped back


def test_a_blocking_rule_matches_root_blockers_with_enough_long_waiters_only() -> None:
    rule = SessionRule.model_validate(
        {"name": "b", "action": "terminate", "blocking": {"minBlocked": 2, "minWait": "10s"}}
    )
    matcher = RuleMatcher.of(rule)
    base = session("idle in transaction")
    assert not matcher(base)  # blocks nobody
    assert matcher(dataclasses.replace(base, blocked=(2, 3), blocked_waits=(15.0, 11.0)))
    assert not matcher(dataclasses.replace(base, blocked=(2, 3), blocked_waits=(15.0, 9.0)))  # 2nd waited too little
    assert not matcher(dataclasses.replace(base, blocked=(2,), blocked_waits=(15.0,)))  # too few
    assert not matcher(dataclasses.replace(base, blocked=(2, 3), blocked_waits=(15.0, 11.0), waiting=True))  # not root
    assert matcher.overshoot(dataclasses.replace(base, blocked=(2, 3), blocked_waits=(15.0, 9.0))) == -1.0


def test_the_window_fraction_is_of_the_backends_there_were_when_the_window_began() -> None:
    """6 of 10 sessions already terminated in this window: 4 idle ones left (5 backends with the engine)."""
    idle = [session("idle", age=100.0) for _ in range(4)]
    rules = [{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "10s"}]
    whole = spec(sessions=rules, limits={"maxActionsPerCycle": 1000, "maxFractionPerCycle": 1.0})
    assert len(plan(observation(*idle), whole, used=6).actions) == 4  # 1.0 means every one of them
    half = spec(sessions=rules, limits={"maxActionsPerCycle": 1000, "maxFractionPerCycle": 0.5})
    assert len(plan(observation(*idle, clients=6), half, used=4).actions) == 1  # floor(0.5 x 10) - 4
    assert len(plan(observation(*idle, clients=5), half, used=5).actions) == 0  # half of 10 already gone
