"""The autovacuum decisions as pure code: cases a real server cannot be pushed into on demand.

A worker vacuuming "to prevent wraparound" is the main one: provoking one for real needs ~200 million
transactions (or a frozen-xid hack), so the wraparound skip is tested here on the decision function, and
the real-server tests show the same function driving real workers.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from pgwarden.engine.autovacuum_plan import (
    AutovacuumReport,
    ReleaseReport,
    SettingState,
    SkippedWorker,
    Worker,
    choose_workers_to_stop,
    foreign_value,
    is_pending_restart,
    pending_value,
    plan_setting,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def worker(pid: int, started_s: int, table: str = "public.t", wraparound: bool = False) -> Worker:
    suffix = " (to prevent wraparound)" if wraparound else ""
    return Worker(pid, T0 + timedelta(seconds=started_s), f"autovacuum: VACUUM {table}{suffix}")


PG15 = SettingState(
    server_version=150014,
    in_force=3,
    context="postmaster",
    pending_restart=False,
    source="default",
    boot_value=3,
    other_backends=209,
    file_readable=True,
)
PG18 = SettingState(
    server_version=180006,
    in_force=3,
    context="sighup",
    pending_restart=False,
    source="default",
    boot_value=3,
    worker_slots=16,
    other_backends=209,
    file_readable=True,
)


# -- which workers ---------------------------------------------------------------------------------------


def test_nothing_to_stop_at_or_below_the_cap() -> None:
    workers = [worker(1, 0), worker(2, 1)]
    assert choose_workers_to_stop(workers, 2) == ([], [])
    assert choose_workers_to_stop([], 1) == ([], [])


def test_the_newest_workers_above_the_cap_are_chosen() -> None:
    workers = [worker(10, 5), worker(11, 1), worker(12, 9), worker(13, 3)]
    stop, skipped = choose_workers_to_stop(workers, 2)
    assert [w.pid for w in stop] == [12, 10]
    assert skipped == []


def test_a_wraparound_worker_is_never_chosen_and_an_older_one_goes_instead() -> None:
    workers = [worker(1, 0), worker(2, 1), worker(3, 2, wraparound=True), worker(4, 3)]
    stop, skipped = choose_workers_to_stop(workers, 2)
    assert [w.pid for w in stop] == [4, 2]
    assert skipped == [SkippedWorker(3, "wraparound")]


def test_wraparound_matches_vacuum_analyze_and_any_table() -> None:
    w = Worker(7, T0, 'autovacuum: VACUUM ANALYZE "odd schema"."t" (to prevent wraparound)')
    assert w.prevents_wraparound
    assert not Worker(8, T0, "autovacuum: VACUUM public.t").prevents_wraparound
    assert not Worker(9, T0, None).prevents_wraparound


def test_when_only_wraparound_workers_remain_fewer_are_stopped() -> None:
    workers = [worker(1, 0), worker(2, 1, wraparound=True), worker(3, 2, wraparound=True)]
    stop, skipped = choose_workers_to_stop(workers, 1)
    assert [w.pid for w in stop] == [1]
    assert skipped == [SkippedWorker(3, "wraparound"), SkippedWorker(2, "wraparound")]
    stop, skipped = choose_workers_to_stop(workers[1:], 0)
    assert stop == []
    assert [s.pid for s in skipped] == [3, 2]


def test_a_worker_whose_query_cannot_be_read_is_not_stopped() -> None:
    workers = [worker(1, 0), Worker(2, T0 + timedelta(seconds=5), "<insufficient privilege>"), Worker(3, None, None)]
    stop, skipped = choose_workers_to_stop(workers, 1)
    assert [w.pid for w in stop] == [1]
    assert skipped == [SkippedWorker(2, "query-unknown"), SkippedWorker(3, "query-unknown")]


def test_ties_in_start_time_fall_back_to_the_higher_pid() -> None:
    stop, _ = choose_workers_to_stop([worker(5, 0), worker(9, 0), worker(7, 0)], 1)
    assert [w.pid for w in stop] == [9, 7]


# -- what to write ---------------------------------------------------------------------------------------


def test_pg18_writes_when_the_value_in_force_differs() -> None:
    assert plan_setting(PG18, 2).write
    assert not plan_setting(replace(PG18, in_force=2, file_value="2"), 2).write


def test_pg18_refuses_more_than_the_worker_slots_naming_both_numbers() -> None:
    plan = plan_setting(replace(PG18, worker_slots=4), 6)
    assert not plan.write
    assert plan.error is not None
    assert "6" in plan.error
    assert "autovacuum_worker_slots = 4" in plan.error
    assert plan_setting(replace(PG18, worker_slots=4), 4).write


def test_pg18_rewrites_a_value_written_but_not_yet_reloaded() -> None:
    assert plan_setting(replace(PG18, file_value="2"), 2).write


def test_pg15_writes_once_then_waits_for_the_restart() -> None:
    assert plan_setting(PG15, 2).write
    pending = replace(PG15, pending_restart=True, file_value="2")
    assert not plan_setting(pending, 2).write
    assert is_pending_restart(pending)
    assert pending_value(pending) == 2


def test_pg15_overwrites_someone_elses_pending_value() -> None:
    assert plan_setting(replace(PG15, pending_restart=True, file_value="5"), 2).write
    # ... even when the value in force already is the desired one: the restart would undo it.
    assert plan_setting(replace(PG15, in_force=2, pending_restart=True, file_value="5"), 2).write


def test_pg15_without_pg_file_settings_never_writes_while_a_restart_is_pending() -> None:
    blind = replace(PG15, file_readable=False)
    assert plan_setting(blind, 2).write
    plan = plan_setting(replace(blind, pending_restart=True), 2)
    assert not plan.write
    assert plan.warning is not None
    assert "pg_file_settings" in plan.warning
    assert is_pending_restart(replace(blind, pending_restart=True))
    assert pending_value(replace(blind, pending_restart=True)) is None


def test_pg15_a_stale_pending_restart_flag_is_corrected_by_the_files() -> None:
    # After ALTER SYSTEM RESET of a value never applied, PostgreSQL <= 17 keeps pending_restart set.
    stale = replace(PG15, pending_restart=True, file_value=None)
    assert not is_pending_restart(stale)
    assert not plan_setting(stale, 3).write


def test_a_value_on_the_command_line_cannot_be_overridden() -> None:
    plan = plan_setting(replace(PG15, source="command line", in_force=4), 2)
    assert not plan.write
    assert plan.error is not None
    assert "command line" in plan.error
    assert plan_setting(replace(PG15, source="command line", in_force=2), 2) == plan_setting(
        replace(PG15, in_force=2, file_value="2"), 2
    )


def test_pg15_refuses_a_value_the_server_could_not_start_with() -> None:
    plan = plan_setting(PG15, 262143)
    assert not plan.write
    assert plan.error is not None
    assert "refuse to start" in plan.error


def test_an_unparsable_file_value_is_replaced() -> None:
    assert plan_setting(replace(PG15, file_value="lots"), 2).write


# -- reports ---------------------------------------------------------------------------------------------


def test_report_json_has_the_issue_shape() -> None:
    report = AutovacuumReport(desired=2, in_force=3, written=True, pending_restart=True, pending_value=2)
    report.running_workers = 1
    report.cancelled.append(4711)
    report.skipped.append(SkippedWorker(4712, "wraparound"))
    data = report.to_json()
    issue_fields = {"desired": 2, "inForce": 3, "written": True, "pendingRestart": True}
    assert {key: data["maxWorkers"][key] for key in issue_fields} == issue_fields
    assert data["runningWorkers"] == 1
    assert data["cancelled"] == [4711]
    assert data["skipped"] == [{"pid": 4712, "reason": "wraparound"}]
    assert data["dryRun"] is False
    assert data["errors"] == []


def test_release_report_json() -> None:
    report = ReleaseReport(written=2, outcome="changed", found="4", message="left alone")
    assert not report.reset
    assert report.to_json()["reset"] is False
    assert report.to_json()["found"] == "4"
    assert ReleaseReport(written=2, outcome="reset").to_json()["reset"] is True


@pytest.mark.parametrize("value", [0, 262144, True])
def test_alter_system_value_is_checked(value: int) -> None:
    from pgwarden.engine.autovacuum import _alter_system_set

    with pytest.raises(ValueError, match="autovacuum_max_workers"):
        _alter_system_set(value)


def test_a_value_pgwarden_did_not_write_is_foreign_only_once_it_has_written() -> None:
    dba = replace(PG18, auto_conf_value="4", file_value="4")
    assert foreign_value(dba, 2, None) is None  # before its first write: replaced once (a leftover, or the state)
    assert foreign_value(dba, 2, 2) == "4"  # after writing 2: someone else wrote 4
    assert foreign_value(dba, 3, 2) == "4"  # a changed cap does not license overwriting it
    assert foreign_value(dba, 4, 2) is None  # it holds what the policy wants: no dispute
    assert foreign_value(replace(dba, auto_conf_value="2"), 3, 2) is None  # its own earlier value: a policy change
    assert foreign_value(replace(PG18, file_value="4"), 2, 2) is None  # in postgresql.conf only: not ALTER SYSTEM's
    assert foreign_value(replace(dba, file_readable=False), 2, 2) is None  # cannot tell whose it is
