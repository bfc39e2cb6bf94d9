"""Events summarise a cycle per target: one per reason, with pod, rule, count and pids."""

from __future__ import annotations

import dataclasses

from pgwarden.enforcement.events import events_for_cycle
from pgwarden.engine.autovacuum_plan import AutovacuumReport
from pgwarden.policy.api import EventReason
from pgwarden.policy.model import SessionAction
from tests.harness.reports import action, cycle_report


def test_terminations_and_cancels_aggregate_per_rule() -> None:
    report = cycle_report(
        action(1),
        action(2),
        action(3, rule="slow", kind=SessionAction.CANCEL),
        action(4, done=False),
    )
    events = events_for_cycle("db-0", report)
    assert [(e.reason, e.message) for e in events] == [
        (EventReason.QUERIES_CANCELLED, "pod db-0: rule slow cancelled the queries of 1 session (pids 3)"),
        (EventReason.SESSIONS_TERMINATED, "pod db-0: rule idle terminated 2 sessions (pids 1, 2)"),
    ]


def test_dry_run_posts_dry_run_events() -> None:
    (event,) = events_for_cycle("db-0", cycle_report(action(9, done=False), dry_run=True))
    assert (event.reason, event.message) == (
        EventReason.DRY_RUN,
        "pod db-0: rule idle would terminate 1 session (pids 9)",
    )


def test_autovacuum_capped_event_and_quiet_cycle_has_none() -> None:
    capped = AutovacuumReport(desired=2, written=True, pending_restart=True, cancelled=[11])
    (event,) = events_for_cycle("db-0", cycle_report(autovacuum=capped))
    assert event.reason == EventReason.AUTOVACUUM_CAPPED
    assert "autovacuum_max_workers to 2 (pending a restart)" in event.message
    assert "pids 11" in event.message
    assert events_for_cycle("db-0", cycle_report()) == []
    assert events_for_cycle("db-0", cycle_report(autovacuum=AutovacuumReport(desired=2, in_force=2))) == []


def test_dry_run_autovacuum_cap_posts_what_it_would_do() -> None:
    """A dry run reports `would_write`/`would_cancel`, never `written`/`cancelled`: the Event must still come."""
    would = AutovacuumReport(desired=2, dry_run=True, in_force=3, would_write=True, would_cancel=[21, 22])
    (event,) = events_for_cycle("db-0", cycle_report(autovacuum=would, dry_run=True))
    assert event.reason == EventReason.DRY_RUN
    assert event.message == (
        "pod db-0: would set autovacuum_max_workers to 2 and would stop 2 excess autovacuum workers (pids 21, 22)"
    )
    only_setting = AutovacuumReport(desired=2, dry_run=True, in_force=3, would_write=True)
    (event,) = events_for_cycle("db-0", cycle_report(autovacuum=only_setting, dry_run=True))
    assert event.message == "pod db-0: would set autovacuum_max_workers to 2"


def test_many_pids_are_truncated_in_the_message() -> None:
    (event,) = events_for_cycle("db-0", cycle_report(*(action(p, rule="r") for p in range(30))))
    assert "and 10 more" in event.message


def test_a_blocker_event_says_whom_it_held_up_and_for_how_long() -> None:
    blocker = dataclasses.replace(action(7, rule="idle-blockers"), blocked=(11, 12, 13), longest_wait_seconds=12.4)
    (event,) = events_for_cycle("db-0", cycle_report(blocker))
    assert event.message == (
        "pod db-0: rule idle-blockers terminated 1 session (pids 7) that blocked 3 sessions for 12s"
    )
    assert blocker.to_json()["blocked"] == [11, 12, 13]
    assert "blocked" not in action(8).to_json()  # the enforce JSON of other rules is unchanged
