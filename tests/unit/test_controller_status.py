"""Status computation: what a policy's status says after a cycle, with several writers sharing it."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from pgwarden.enforcement.status import (
    MAX_LAST_ACTIONS,
    PolicyCondition,
    TargetUpdate,
    WrittenRecord,
    differs,
    fit_status,
    next_status,
    status_size,
    written_records,
)
from pgwarden.engine.autovacuum_plan import AutovacuumReport
from pgwarden.engine.report import SkipRecord
from pgwarden.policy.api import ConditionReason, ConditionType, SkipReason
from tests.harness.reports import action, cycle_report

TERMINATED = action(7)


def test_a_cycle_that_acted_records_actions_totals_and_ready() -> None:
    status = next_status(
        None, generation=3, updates=[TargetUpdate("db-0", "127.0.0.2", "controller", cycle_report(TERMINATED))]
    )
    (target,) = status["targets"]
    assert target["pod"] == "db-0"
    assert target["lastActions"] == [
        {"rule": "idle", "action": "terminate", "pid": 7, "user": "app", "state": "idle", "done": True}
    ]
    assert status["totals"] == {"actions": 1, "terminated": 1, "cancelled": 0, "autovacuumCancelled": 0}
    ready = next(c for c in status["conditions"] if c["type"] == ConditionType.READY)
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "True",
        ConditionReason.TARGETS_EVALUATED,
        3,
    )
    assert status["observedGeneration"] == 3
    assert (status["targetCount"], status["readyTargets"]) == (1, 1)


def test_dry_run_actions_are_shown_but_not_counted() -> None:
    would = dataclasses.replace(TERMINATED, done=False)
    status = next_status(
        None, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report(would, dry_run=True))]
    )
    assert status["totals"]["actions"] == 0
    assert status["targets"][0]["lastActions"][0]["done"] is False


def test_totals_accumulate_and_last_actions_survive_a_quiet_cycle() -> None:
    first = next_status(
        None, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report(TERMINATED))]
    )
    second = next_status(first, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report())])
    assert second["totals"]["terminated"] == 1
    assert second["targets"][0]["lastActions"] == first["targets"][0]["lastActions"]


def test_failing_target_makes_policy_degraded_and_names_it() -> None:
    status = next_status(
        None,
        generation=1,
        updates=[
            TargetUpdate("db-0", None, "controller", cycle_report()),
            TargetUpdate("db-1", None, "controller", error="connection refused"),
        ],
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions[ConditionType.READY]["status"] == "False"
    assert conditions[ConditionType.DEGRADED]["status"] == "True"
    assert "db-1: connection refused" in conditions[ConditionType.DEGRADED]["message"]
    assert (status["targetCount"], status["readyTargets"]) == (2, 1)


def test_a_policy_is_not_ready_before_its_first_evaluation_lands() -> None:
    """The first step writes while the first pass is in flight: owned pods, no entry yet. That is not Ready
    (it once said Ready=True "no running pod matches spec.selector"), and nothing failed: not Degraded."""
    first = next_status(None, generation=1, updates=[], owned_pods=["db-0", "db-1"])
    conditions = {c["type"]: c for c in first["conditions"]}
    assert conditions[ConditionType.READY]["status"] == "False"
    assert conditions[ConditionType.READY]["reason"] == ConditionReason.TARGETS_PENDING
    assert conditions[ConditionType.READY]["message"] == "2 selected targets, none evaluated yet"
    assert conditions[ConditionType.DEGRADED]["status"] == "False"
    assert first["targetCount"] == 0

    landed = next_status(
        first, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report())], owned_pods=["db-0"]
    )
    conditions = {c["type"]: c for c in landed["conditions"]}
    assert conditions[ConditionType.READY]["status"] == "True"
    assert conditions[ConditionType.READY]["reason"] == ConditionReason.TARGETS_EVALUATED

    nothing = next_status(None, generation=1, updates=[], owned_pods=[])
    conditions = {c["type"]: c for c in nothing["conditions"]}
    assert (conditions[ConditionType.READY]["status"], conditions[ConditionType.READY]["reason"]) == (
        "True",
        ConditionReason.NO_TARGETS,
    )


def test_departed_pods_are_dropped_but_other_writers_entries_stay() -> None:
    status = next_status(
        None,
        generation=1,
        updates=[
            TargetUpdate("db-0", None, "controller", cycle_report()),
            TargetUpdate("db-1", None, "controller", cycle_report()),
            TargetUpdate("db-2", None, "sidecar", cycle_report()),
        ],
    )
    after = next_status(status, generation=1, updates=[], owned_pods=["db-0"])
    assert [t["pod"] for t in after["targets"]] == ["db-0", "db-2"]


def test_a_sidecar_never_drops_a_sibling_sidecars_entry() -> None:
    status = next_status(None, generation=1, updates=[TargetUpdate("db-1", None, "sidecar", cycle_report())])
    after = next_status(
        status,
        generation=1,
        updates=[TargetUpdate("db-2", None, "sidecar", cycle_report())],
        owned_pods=["db-2"],
        scope=lambda pod: pod == "db-2",
    )
    assert [t["pod"] for t in after["targets"]] == ["db-1", "db-2"]


def test_controller_skip_notice_does_not_overwrite_the_sidecars_cycle_report() -> None:
    status = next_status(None, generation=1, updates=[TargetUpdate("db-1", None, "sidecar", cycle_report(TERMINATED))])
    after = next_status(
        status, generation=1, updates=[TargetUpdate("db-1", None, "controller", skipped_reason="sidecar")]
    )
    assert after["targets"][0]["enforcer"] == "sidecar"
    assert "skippedReason" not in after["targets"][0]


def test_condition_override_and_transition_time_kept_when_status_unchanged() -> None:
    invalid = PolicyCondition(ConditionType.READY, "False", ConditionReason.INVALID_SPEC, "spec.interval: bad")
    first = next_status(None, generation=2, updates=[], policy_condition=invalid)
    ready = next(c for c in first["conditions"] if c["type"] == ConditionType.READY)
    assert (ready["reason"], ready["message"]) == (ConditionReason.INVALID_SPEC, "spec.interval: bad")
    again = next_status(first, generation=2, updates=[], policy_condition=invalid)
    assert again["conditions"] == first["conditions"]
    assert not differs(first, again)


def test_only_timestamps_changing_is_not_a_difference() -> None:
    a = next_status(
        None,
        generation=1,
        updates=[TargetUpdate("db-0", None, "controller", cycle_report(), when="2026-01-01T00:00:00Z")],
    )
    b = next_status(
        a, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report(), when="2026-01-01T00:01:00Z")]
    )
    assert a["targets"][0]["lastCycleTime"] != b["targets"][0]["lastCycleTime"]
    assert not differs(a, b)
    c = next_status(b, generation=1, updates=[TargetUpdate("db-0", None, "controller", error="boom")])
    assert differs(b, c)


def test_autovacuum_is_serialised_into_the_entry_and_only_real_stops_are_counted() -> None:
    capped = AutovacuumReport(desired=2, in_force=3, written=True, cancelled=[11, 12])
    when = "2026-01-01T00:00:00Z"
    status = next_status(
        None,
        generation=1,
        updates=[TargetUpdate("db-0", None, "controller", cycle_report(autovacuum=capped), when=when)],
    )
    assert status["targets"][0]["autovacuum"] == {**capped.to_json(), "written": {"value": 2, "time": when}}
    assert status["totals"] == {"actions": 2, "terminated": 0, "cancelled": 0, "autovacuumCancelled": 2}
    would = AutovacuumReport(desired=2, dry_run=True, in_force=3, would_write=True, would_cancel=[11, 12])
    dry = next_status(
        None,
        generation=1,
        updates=[TargetUpdate("db-0", None, "controller", cycle_report(autovacuum=would, dry_run=True))],
    )
    assert dry["targets"][0]["autovacuum"]["wouldCancel"] == [11, 12]
    assert dry["totals"]["actions"] == 0


def test_the_last_cycles_skips_are_counted_by_reason_and_cleared_by_a_cycle_without() -> None:
    skipped = (
        SkipRecord("idle", 5, SkipReason.MAX_ACTIONS),
        SkipRecord("idle", 6, SkipReason.MAX_ACTIONS),
        SkipRecord("slow", 7, SkipReason.GONE),
    )
    limited = cycle_report(TERMINATED, skipped=skipped)
    first = next_status(None, generation=1, updates=[TargetUpdate("db-0", None, "controller", limited)])
    assert first["targets"][0]["skipped"] == {SkipReason.GONE: 1, SkipReason.MAX_ACTIONS: 2}
    assert list(first["targets"][0]["skipped"]) == ["gone", "maxActionsPerCycle"]  # sorted: a stable status
    quiet = next_status(first, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report())])
    assert "skipped" not in quiet["targets"][0]
    assert differs(first, quiet)  # the skips going away is news, not a heartbeat


def test_a_target_missing_grants_is_failing_with_reason_insufficient_privileges() -> None:
    """Evaluated, but unable to see or signal sessions: the target's error names the grant, Ready=False and
    Degraded=True with reason InsufficientPrivileges (a GRANT fixes it)."""
    blind = cycle_report(missing_privileges=("pg_signal_backend",))
    status = next_status(
        None,
        generation=1,
        updates=[
            TargetUpdate("db-0", None, "controller", cycle_report()),
            TargetUpdate("db-1", None, "controller", blind),
        ],
    )
    entry = {t["pod"]: t for t in status["targets"]}["db-1"]
    assert entry["error"].startswith("InsufficientPrivileges: ")
    assert "pg_signal_backend" in entry["error"]
    assert "error" not in {t["pod"]: t for t in status["targets"]}["db-0"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions[ConditionType.READY]["status"] == "False"
    assert conditions[ConditionType.DEGRADED]["status"] == "True"
    assert conditions[ConditionType.DEGRADED]["reason"] == ConditionReason.INSUFFICIENT_PRIVILEGES
    assert conditions[ConditionType.READY]["reason"] == ConditionReason.INSUFFICIENT_PRIVILEGES
    assert "db-1: InsufficientPrivileges: " in conditions[ConditionType.DEGRADED]["message"]
    assert (status["targetCount"], status["readyTargets"]) == (2, 1)


def test_an_unreachable_target_outranks_missing_grants_in_the_reason() -> None:
    status = next_status(
        None,
        generation=1,
        updates=[
            TargetUpdate("db-0", None, "controller", cycle_report(missing_privileges=("pg_read_all_stats",))),
            TargetUpdate("db-1", None, "controller", error="connection refused"),
        ],
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions[ConditionType.DEGRADED]["reason"] == ConditionReason.TARGET_ERRORS
    # Once the grant is given, the next cycle's report clears the target's error.
    healed = next_status(status, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report())])
    assert "error" not in {t["pod"]: t for t in healed["targets"]}["db-0"]


def test_last_actions_keep_the_newest_twenty() -> None:
    status = next_status(
        None, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report(*map(action, range(1, 31))))]
    )
    (entry,) = status["targets"]
    assert [a["pid"] for a in entry["lastActions"]] == list(range(11, 31))
    assert status["totals"]["terminated"] == 30


def test_a_thousand_acting_targets_with_long_errors_stay_under_256_kib() -> None:
    """20 actions each, a 5,000-character error each (an interrupted cycle), pod names of a StatefulSet."""
    long_error = "connection lost while signalling: " + "x" * 5000
    updates = [
        TargetUpdate(
            f"postgres-cluster-{i:04d}",
            f"10.1.{i // 250}.{i % 250}",
            "controller",
            cycle_report(*(action(1000 * i + n) for n in range(20)), skipped=_skips(3)),
            error=long_error,
        )
        for i in range(1000)
    ]
    one = next_status(None, generation=1, updates=updates[:1])
    print(f"one acting target: {status_size(one)} bytes of status")
    status = next_status(None, generation=1, updates=updates)
    size = status_size(status)
    print(f"1,000 acting targets: {size} bytes of status ({size / 1024:.0f} KiB)")
    assert size < 256 * 1024
    assert len(status["targets"]) == 1000
    assert all(t["error"].startswith("connection lost") for t in status["targets"])
    assert status["totals"]["terminated"] == 20_000  # totals are never compacted
    assert all(len(t.get("lastActions", [])) <= MAX_LAST_ACTIONS for t in status["targets"])
    # Writing again over the compacted status changes nothing but timestamps: no write per cycle.
    again = next_status(status, generation=1, updates=[dataclasses.replace(updates[0], report=cycle_report())])
    assert status_size(again) < 256 * 1024


def test_a_status_that_fits_is_not_compacted() -> None:
    updates = [TargetUpdate(f"db-{i}", None, "controller", cycle_report(*map(action, range(20)))) for i in range(10)]
    status = next_status(None, generation=1, updates=updates)
    assert all(len(t["lastActions"]) == 20 for t in status["targets"])
    assert fit_status(copy.deepcopy(status)) == status


def _skips(count: int) -> tuple[SkipRecord, ...]:
    return tuple(SkipRecord("idle", 900 + n, SkipReason.MAX_ACTIONS) for n in range(count))


def test_what_pgwarden_wrote_is_recorded_kept_across_cycles_and_dropped_only_when_released() -> None:
    wrote = AutovacuumReport(desired=2, in_force=3, written=True)
    first = next_status(
        None,
        generation=1,
        updates=[TargetUpdate("db-0", None, "controller", cycle_report(autovacuum=wrote), when="2026-01-01T00:00:00Z")],
    )
    record: dict[str, Any] = {"value": 2, "time": "2026-01-01T00:00:00Z"}
    assert first["targets"][0]["autovacuum"]["written"] == record
    quiet = AutovacuumReport(desired=2, in_force=2)  # the next cycle writes nothing: the record stays
    second = next_status(
        first, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report(autovacuum=quiet))]
    )
    assert second["targets"][0]["autovacuum"]["written"] == record
    assert written_records(second, "controller") == {"db-0": WrittenRecord("db-0", 2, record["time"])}
    assert written_records(second, "sidecar") == {}
    failed = next_status(second, generation=1, updates=[TargetUpdate("db-0", None, "controller", error="gone")])
    assert failed["targets"][0]["autovacuum"]["written"] == record
    released = next_status(failed, generation=2, updates=[TargetUpdate("db-0", None, "controller", released=True)])
    assert "autovacuum" not in released["targets"][0]
    assert written_records(released, "controller") == {}


def test_a_dry_run_never_records_a_write() -> None:
    would = AutovacuumReport(desired=2, dry_run=True, in_force=3, would_write=True)
    status = next_status(
        None,
        generation=1,
        updates=[TargetUpdate("db-0", None, "controller", cycle_report(autovacuum=would, dry_run=True))],
    )
    assert "written" not in status["targets"][0]["autovacuum"]
    assert written_records(status, "controller") == {}


def test_a_cap_conflict_is_degraded_autovacuum_conflict_naming_the_other_policy() -> None:
    conflict = AutovacuumReport(desired=2, conflicts_with=["ns/cap-b"], errors=["autovacuum: conflict"])
    status = next_status(
        None, generation=1, updates=[TargetUpdate("db-0", None, "controller", cycle_report(autovacuum=conflict))]
    )
    degraded = next(c for c in status["conditions"] if c["type"] == ConditionType.DEGRADED)
    assert (degraded["status"], degraded["reason"]) == ("True", ConditionReason.AUTOVACUUM_CONFLICT)
    assert "ns/cap-b" in degraded["message"]
    assert "db-0" in degraded["message"]


def test_next_status_never_changes_the_status_it_is_given() -> None:
    """`current` is kopf's body of the policy: next_status shares the entries it leaves alone instead of
    copying the whole status, so whatever it changes (entries, lastActions, autovacuum records, writes,
    totals, conditions, a compaction) must be built anew, never edited in place."""
    busy = cycle_report(TERMINATED, TERMINATED, backends={"client backend": 3, "walwriter": 1})
    current = next_status(
        None,
        generation=1,
        updates=[
            TargetUpdate("db-0", "127.0.0.2", "controller", busy),
            TargetUpdate("db-1", "127.0.0.3", "controller", error="connection refused"),
            TargetUpdate("db-2", "127.0.0.4", "controller", writing=3),
            TargetUpdate("db-3", "127.0.0.5", "sidecar", busy),
        ],
        write=("controller", "first"),
    )
    before = copy.deepcopy(current)
    steps: list[tuple[list[TargetUpdate], list[str] | None, PolicyCondition | None]] = [
        ([TargetUpdate("db-0", "127.0.0.2", "controller", cycle_report())], ["db-0", "db-2"], None),
        ([TargetUpdate("db-2", "127.0.0.4", "controller", released=True)], ["db-2"], None),
        ([TargetUpdate("db-3", "127.0.0.5", "controller", skipped_reason="its sidecar enforces it")], ["db-0"], None),
        ([TargetUpdate("db-1", "127.0.0.3", "controller", busy)], None, None),
        ([], [], PolicyCondition(ConditionType.READY, "False", ConditionReason.INVALID_SPEC, "bad")),
    ]
    for updates, owned, condition in steps:
        after = next_status(
            current,
            generation=2,
            updates=updates,
            owned_pods=owned,
            policy_condition=condition,
            carried_totals={"actions": 2, "terminated": 2},
            write=("sidecar/db-3", "second"),
        )
        assert after != current
    assert current == before

    # Over the size limit: every entry is compacted, into new entries.
    crowded = next_status(
        None, generation=1, updates=[TargetUpdate(f"db-{i}", None, "controller", error="e" * 900) for i in range(400)]
    )
    crowded_before = copy.deepcopy(crowded)
    next_status(crowded, generation=1, updates=[TargetUpdate("db-0", None, "controller", busy)])
    assert crowded == crowded_before
