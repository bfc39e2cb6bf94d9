"""Wake-ups for known crossings, as pure functions: which sessions are due, and who was just signalled."""

from __future__ import annotations

import dataclasses

from pgwarden.engine.decide import plan
from pgwarden.engine.wake import SIGNAL_MEMORY_SECONDS, SignalMemory, aged, due_now, identity
from tests.harness.observations import observation, session, spec

RULE = {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "10s"}


def test_a_session_is_due_only_once_its_crossing_has_come_and_never_early() -> None:
    soon, later = session(age=9.0), session(age=5.0)
    seen = dataclasses.replace(
        dataclasses.replace(observation(), received_at=100.0), upcoming=((1.0, soon), (5.0, later)), next_crossing=1.0
    )
    assert due_now(seen, 100.99).sessions == ()
    carried = due_now(seen, 101.0)
    assert [s.pid for s in carried.sessions] == [soon.pid]
    assert carried.sessions[0].state_age == 10.0  # aged by the time elapsed: it matches the rule now
    assert carried.upcoming == ()
    assert carried.next_crossing is None
    policy = spec(sessions=[RULE])
    assert [a.session.pid for a in plan(carried, policy).actions] == [soon.pid]
    assert [s.pid for s in due_now(seen, 106.0).sessions] == [soon.pid, later.pid]


def test_ageing_keeps_unknown_ages_unknown() -> None:
    s = aged(session(age=None, query_age=3.0), 2.0)
    assert s.state_age is None
    assert s.query_age == 5.0
    assert s.transaction_age is None


def test_the_blast_radius_window_bounds_a_wake_up_like_any_cycle() -> None:
    due = [session(age=10.0) for _ in range(5)]
    seen = dataclasses.replace(observation(*due), sessions=(), upcoming=tuple((0.0, s) for s in due))
    policy = spec(sessions=[RULE], limits={"maxActionsPerCycle": 3, "maxFractionPerCycle": 1.0})
    carried = due_now(seen, 0.5)
    assert len(plan(carried, policy, used=0).actions) == 3
    assert len(plan(carried, policy, used=2).actions) == 1  # two already taken in this window
    assert plan(carried, policy, used=3).actions == ()


def test_signalled_sessions_are_left_out_until_the_memory_lapses() -> None:
    gone, other = session(), session()
    memory = SignalMemory()
    memory.remember([gone], now=10.0)
    seen = dataclasses.replace(observation(gone, other), upcoming=((1.0, gone), (2.0, other)))
    left = memory.without_recent(seen, now=10.0 + SIGNAL_MEMORY_SECONDS - 0.01)
    assert [s.pid for s in left.sessions] == [other.pid]
    assert [s.pid for _, s in left.upcoming] == [other.pid]
    assert left.backends == seen.backends  # it was there: the counts say so
    assert memory.without_recent(seen, now=10.0 + SIGNAL_MEMORY_SECONDS) is seen  # forgotten


def test_a_new_state_is_a_new_identity() -> None:
    # A cancelled query leaves the session in another state: a rule may select it again, so it is not remembered.
    s = session()
    moved = dataclasses.replace(s, state_change=s.backend_start)
    memory = SignalMemory()
    memory.remember([s], now=0.0)
    assert identity(moved) not in memory.recent(1.0)
    assert identity(s) in memory.recent(1.0)
