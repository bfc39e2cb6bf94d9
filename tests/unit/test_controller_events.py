"""Events summarise a cycle per target: one per reason, with pod, rule, count and pids."""

from __future__ import annotations

from pgwarden.enforcement.events import events_for_cycle


def test_terminations_and_cancels_aggregate_per_rule() -> None:
    report = {
        "enforcementAction": "enforce",
        "actions": [
            {"rule": "idle", "action": "terminate", "pid": 1, "done": True},
            {"rule": "idle", "action": "terminate", "pid": 2, "done": True},
            {"rule": "slow", "action": "cancel", "pid": 3, "done": True},
            {"rule": "idle", "action": "terminate", "pid": 4, "done": False},
        ],
    }
    events = events_for_cycle("db-0", report)
    assert [(e.reason, e.message) for e in events] == [
        ("QueriesCancelled", "pod db-0: rule slow cancelled the queries of 1 session (pids 3)"),
        ("SessionsTerminated", "pod db-0: rule idle terminated 2 sessions (pids 1, 2)"),
    ]


def test_dry_run_posts_dry_run_events() -> None:
    report = {
        "enforcementAction": "dryRun",
        "actions": [{"rule": "idle", "action": "terminate", "pid": 9, "done": False}],
    }
    (event,) = events_for_cycle("db-0", report)
    assert (event.reason, event.message) == ("DryRun", "pod db-0: rule idle would terminate 1 session (pids 9)")


def test_autovacuum_capped_event_and_quiet_cycle_has_none() -> None:
    report = {
        "enforcementAction": "enforce",
        "actions": [],
        "autovacuum": {"maxWorkers": {"desired": 2, "written": True, "pendingRestart": True}, "cancelled": [11]},
    }
    (event,) = events_for_cycle("db-0", report)
    assert event.reason == "AutovacuumCapped"
    assert "autovacuum_max_workers to 2 (pending a restart)" in event.message
    assert "pids 11" in event.message
    assert events_for_cycle("db-0", {"enforcementAction": "enforce", "actions": []}) == []


def test_many_pids_are_truncated_in_the_message() -> None:
    actions = [{"rule": "r", "action": "terminate", "pid": p, "done": True} for p in range(30)]
    (event,) = events_for_cycle("db-0", {"enforcementAction": "enforce", "actions": actions})
    assert "and 10 more" in event.message
