"""The blast radius over time: what a window of length `interval` holds, per policy."""

from __future__ import annotations

from pgwarden.engine.budget import ActionBudget
from pgwarden.engine.decide import plan
from tests.harness.observations import observation, session, spec


def test_window_counts_actions_younger_than_it_per_policy() -> None:
    budget = ActionBudget()
    budget.record("a", 3, at=100.0)
    budget.record("a", 2, at=102.0)
    budget.record("b", 1, at=101.0)
    assert budget.used("a", 4.0, now=103.9) == 5
    assert budget.used("a", 4.0, now=104.0) == 2  # an action exactly a window ago is out of it
    assert budget.used("b", 4.0, now=104.0) == 1
    assert budget.frees_at("a", 4.0, now=104.0) == 2.0
    assert budget.used("a", 4.0, now=106.0) == 0
    assert budget.frees_at("a", 4.0, now=106.0) is None


def test_plan_allows_only_what_the_window_has_left() -> None:
    policy = spec(
        limits={"maxActionsPerCycle": 5, "maxFractionPerCycle": 1.0},
        sessions=[{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "0s"}],
    )
    sessions = [session() for _ in range(8)]
    assert len(plan(observation(*sessions), policy, used=0).actions) == 5
    partial = plan(observation(*sessions), policy, used=3)
    assert len(partial.actions) == 2
    assert {s.reason for s in partial.skipped} == {"maxActionsPerCycle"}
    assert len(partial.skipped) == 6
    spent = plan(observation(*sessions), policy, used=5)
    assert spent.actions == ()
    assert len(spent.reserve) == 8
