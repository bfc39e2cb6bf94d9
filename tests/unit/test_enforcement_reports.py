"""The policy Report: what it says per rule and pod, and that it is written only when that changes.

Engine reports come from tests.harness.reports (the engine's own types); the store is a fake that can stall,
so the tests also show that the loop's side (`submit`) never waits for the API server.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections import Counter
from typing import Any

from pgwarden.enforcement.report_queue import ReportQueue
from pgwarden.enforcement.reports import MAX_REPORT_BYTES, ReportState, differs, report_body, rule_names
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate
from pgwarden.engine.report import CycleReport, SkipRecord
from pgwarden.policy import parse_spec
from pgwarden.policy.api import (
    API_VERSION,
    KIND,
    REPORT_KIND,
    REPORT_OMITTED_ANNOTATION,
    REPORT_SOURCE,
    REPORTS_API_VERSION,
    ConditionReason,
    ConditionType,
    ReportResult,
    SkipReason,
)
from pgwarden.policy.model import SessionAction
from pgwarden.settings import DEFAULTS
from tests.harness.postgres import wait_for_async
from tests.harness.reports import action, cycle_report

NS = "team-a"
POLICY = {
    "metadata": {"name": "reaper", "namespace": NS, "uid": "u-1", "generation": 1},
    "spec": {
        "selector": {},
        "sessions": [
            {"name": "idle", "stateAge": "5m", "action": "terminate"},
            {"name": "long", "queryAge": "1h", "action": "cancel"},
        ],
        "connectionLimits": [{"name": "per-user", "groupBy": "user", "max": 10}],
    },
}
RULES = ["idle", "long", "per-user"]
WHEN = "2026-12-02T02:00:00Z"
EPOCH = 1796176800  # WHEN in seconds


def update(pod: str, report: CycleReport | None = None, *, when: str = WHEN, **kwargs: Any) -> TargetUpdate:
    return TargetUpdate(pod, "127.0.0.2", "controller", report, when=when, **kwargs)


def results_by(report: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(r["resources"][0]["name"], r.get("rule")): r for r in report["results"]}


def build(state: ReportState, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    return report_body(NS, POLICY, RULES, state, previous)


def test_rule_names_are_session_rules_then_connection_limits_in_spec_order() -> None:
    assert rule_names(parse_spec(POLICY["spec"])) == RULES


def test_a_rule_that_acted_fails_a_quiet_one_passes_per_pod_with_counts() -> None:
    state = ReportState()
    acted = cycle_report(action(101), action(102), action(7, rule="long", kind=SessionAction.CANCEL))
    state.apply([update("db-0", acted), update("db-1", cycle_report())], ["db-0", "db-1"], None)
    report = build(state)

    assert (report["apiVersion"], report["kind"], report["source"]) == (REPORTS_API_VERSION, REPORT_KIND, REPORT_SOURCE)
    assert report["metadata"]["name"] == "reaper"
    assert report["metadata"]["namespace"] == NS
    (owner,) = report["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": API_VERSION, "kind": KIND, "name": "reaper", "uid": "u-1", "controller": True}
    by = results_by(report)
    assert set(by) == {(pod, rule) for pod in ("db-0", "db-1") for rule in RULES}
    idle = by[("db-0", "idle")]
    assert idle["result"] == ReportResult.FAIL
    assert idle["policy"] == "reaper"
    assert idle["resources"] == [{"apiVersion": "v1", "kind": "Pod", "namespace": NS, "name": "db-0"}]
    assert idle["message"] == "terminated 2 session(s): pid 101, 102"
    assert idle["properties"] == {"enforcementAction": "enforce", "sessions": "2", "skipped": "0"}
    assert idle["timestamp"] == {"seconds": EPOCH, "nanos": 0}
    assert by[("db-0", "long")]["message"] == "cancelled 1 session(s): pid 7"
    assert by[("db-0", "per-user")]["result"] == ReportResult.PASS
    assert all(by[("db-1", rule)]["result"] == ReportResult.PASS for rule in RULES)
    assert report["summary"] == {"pass": 4, "fail": 2, "warn": 0, "error": 0, "skip": 0}


def test_dry_run_fails_with_would_and_skips_only_warn() -> None:
    state = ReportState()
    would = cycle_report(action(5, done=False), dry_run=True)
    skipped = cycle_report(skipped=(SkipRecord("idle", 9, SkipReason.NOT_PERMITTED),))
    state.apply([update("db-0", would), update("db-1", skipped)], ["db-0", "db-1"], None)
    by = results_by(build(state))

    assert by[("db-0", "idle")]["result"] == ReportResult.FAIL
    assert by[("db-0", "idle")]["message"] == "would terminate 1 session(s): pid 5"
    assert by[("db-0", "idle")]["properties"]["enforcementAction"] == "dryRun"
    assert by[("db-1", "idle")]["result"] == ReportResult.WARN
    assert (
        by[("db-1", "idle")]["message"] == f"1 session(s) chosen but left alone ({SkipReason.NOT_PERMITTED}: 1): pid 9"
    )


def test_an_unreachable_target_is_one_error_and_a_sidecar_pod_one_skip() -> None:
    state = ReportState()
    failed = update("db-broken", error="connection to 127.0.0.9:5432 refused")
    sidecar = update("db-side", skipped_reason="enforced by its pgwarden sidecar")
    state.apply([failed, sidecar, update("db-0", cycle_report())], ["db-0", "db-broken"], None)
    report = build(state)
    by = results_by(report)

    assert by[("db-broken", None)]["result"] == ReportResult.ERROR
    assert by[("db-broken", None)]["message"] == "connection to 127.0.0.9:5432 refused"
    assert "rule" not in by[("db-broken", None)]
    assert by[("db-side", None)]["result"] == ReportResult.SKIP
    assert report["summary"] == {"pass": 3, "fail": 0, "warn": 0, "error": 1, "skip": 1}


def test_missing_grants_make_the_pod_an_error() -> None:
    state = ReportState()
    state.apply([update("db-0", cycle_report(missing_privileges=("pg_signal_backend",)))], ["db-0"], None)
    (only,) = build(state)["results"]
    assert only["result"] == ReportResult.ERROR
    assert ConditionReason.INSUFFICIENT_PRIVILEGES in only["message"]


def test_unusable_credentials_make_every_owned_pod_an_error_until_evaluated() -> None:
    state = ReportState()
    state.apply([update("db-0", cycle_report())], ["db-0"], None)
    refused = PolicyCondition(
        ConditionType.READY, "False", ConditionReason.CREDENTIALS_SECRET_NOT_FOUND, "Secret team-a/pg not found"
    )
    state.apply([], ["db-0", "db-1"], refused)
    by = results_by(build(state))
    assert {k: r["result"] for k, r in by.items()} == {("db-0", None): "error", ("db-1", None): "error"}
    assert by[("db-1", None)]["message"] == "Secret team-a/pg not found"

    state.apply([update("db-0", cycle_report()), update("db-1", cycle_report())], ["db-0", "db-1"], None)
    assert {r["result"] for r in build(state)["results"]} == {ReportResult.PASS}


def test_an_invalid_spec_is_one_error_without_resources() -> None:
    state = ReportState()
    invalid = PolicyCondition(ConditionType.READY, "False", ConditionReason.INVALID_SPEC, "spec.interval: bad")
    state.apply([], [], invalid)
    (only,) = report_body(NS, POLICY, [], state)["results"]
    assert (only["result"], only["message"], "resources" in only) == ("error", "spec.interval: bad", False)


def test_departed_pods_leave_and_write_ahead_records_change_nothing() -> None:
    state = ReportState()
    state.apply([update("db-0", cycle_report()), update("db-1", cycle_report())], ["db-0", "db-1"], None)
    state.apply([update("db-0", writing=3)], ["db-0"], None)  # the autovacuum write-ahead carries no verdict
    assert {r["resources"][0]["name"] for r in build(state)["results"]} == {"db-0"}


def test_quiet_cycles_change_nothing_a_new_verdict_does_and_keeps_unchanged_timestamps() -> None:
    state = ReportState()
    state.apply([update("db-0", cycle_report(action(1))), update("db-1", cycle_report())], ["db-0", "db-1"], None)
    # As the API server gives it back: its own key order (a real run rewrote every second before this held).
    written = json.loads(json.dumps(build(state), sort_keys=True))
    later = "2026-12-02T02:05:00Z"
    state.apply([update("db-0", cycle_report(action(1)), when=later)], ["db-0", "db-1"], None)
    assert not differs(written, build(state, written))  # the same verdict later: nothing to write

    state.apply([update("db-0", cycle_report(), when=later)], ["db-0", "db-1"], None)
    changed = build(state, written)
    assert differs(written, changed)
    by = results_by(changed)
    assert by[("db-0", "idle")]["timestamp"]["seconds"] == EPOCH + 300  # changed: when it changed
    assert by[("db-1", "idle")]["timestamp"]["seconds"] == EPOCH  # unchanged: since when it holds


def test_a_report_too_large_leaves_passes_out_first_and_counts_everything() -> None:
    """200 pods x 10 rules is ~650 KB of results: over MAX_REPORT_BYTES, so passes go, fails and errors stay."""
    many = [f"rule-{i}" for i in range(10)]
    state = ReportState()
    acted = {i: action(1000 + i, rule="rule-3") for i in range(0, 199, 50)}  # 4 pods where rule-3 acted
    updates = [update(f"db-{i:03}", cycle_report(*([acted[i]] if i in acted else []))) for i in range(199)]
    updates.append(update("db-199", error="connection refused"))
    state.apply(updates, [u.pod for u in updates], None)
    report = report_body(NS, POLICY, many, state)

    assert report["summary"] == {"pass": 199 * 10 - 4, "fail": 4, "warn": 0, "error": 1, "skip": 0}
    stored = len(json.dumps(report, separators=(",", ":")))  # the API server keeps compact JSON
    assert MAX_REPORT_BYTES * 0.9 < stored <= MAX_REPORT_BYTES + 2048  # the estimate is close
    kept = Counter(r["result"] for r in report["results"])
    assert (kept["fail"], kept["error"]) == (4, 1)
    omitted = 199 * 10 + 1 - len(report["results"])
    assert omitted > 0
    assert report["metadata"]["annotations"] == {REPORT_OMITTED_ANNOTATION: str(omitted)}


def test_long_pid_lists_are_cut() -> None:
    state = ReportState()
    state.apply([update("db-0", cycle_report(*(action(p) for p in range(1, 31))))], ["db-0"], None)
    assert results_by(build(state))[("db-0", "idle")]["message"].endswith("19, 20 and 10 more")


class FakeReports:
    """The Report store in memory, counting writes; `open` cleared makes every call hang (an API stall)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.puts = 0
        self.open = asyncio.Event()
        self.open.set()

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self.open.wait()
        found = self.objects.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def put(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        await self.open.wait()
        self.puts += 1
        key = (namespace, body["metadata"]["name"])
        uid = self.objects.get(key, {}).get("metadata", {}).get("uid") or f"uid-{self.puts}"
        self.objects[key] = copy.deepcopy(body)
        self.objects[key]["metadata"]["uid"] = uid
        return copy.deepcopy(self.objects[key])

    async def delete(self, namespace: str, name: str, uid: str) -> bool:
        await self.open.wait()
        found = self.objects.get((namespace, name))
        if found is None or found["metadata"]["uid"] != uid:
            return False
        del self.objects[(namespace, name)]
        return True


FAST = dataclasses.replace(DEFAULTS, min_delay=0.02, status_retry_max=0.05, api_timeout=0.2)


def queue(store: FakeReports) -> ReportQueue:
    return ReportQueue(store, NS, "reaper", latest=lambda: POLICY, settings=FAST)


async def test_queue_writes_once_per_change_and_not_per_quiet_step() -> None:
    store = FakeReports()
    reports = queue(store)
    try:
        await reports.submit([update("db-0", cycle_report(action(1)))], ["db-0"], None, False)
        await wait_for_async(lambda: store.puts == 1, within=5, message="the first Report")
        for _ in range(5):
            await reports.submit([update("db-0", cycle_report(action(1)))], ["db-0"], None, False)
            # The writer clears its wake-up and decides in one uninterrupted run (the fake store never suspends).
            await wait_for_async(lambda: not reports._wake.is_set(), within=5, message="the writer to look")
            assert store.puts == 1
        await reports.submit([update("db-0", cycle_report())], ["db-0"], None, False)
        await wait_for_async(
            lambda: store.objects[(NS, "reaper")]["summary"]["fail"] == 0, within=5, message="the pass"
        )
        assert store.puts == 2
    finally:
        await reports.close()


async def test_a_restarted_process_does_not_rewrite_an_unchanged_report() -> None:
    store = FakeReports()
    first = queue(store)
    await first.submit([update("db-0", cycle_report())], ["db-0"], None, False)
    await wait_for_async(lambda: store.puts == 1, within=5, message="the first Report")
    await first.close()
    second = queue(store)
    try:
        await second.submit([update("db-0", cycle_report(), when="2026-12-02T03:00:00Z")], ["db-0"], None, False)
        await wait_for_async(lambda: second._read, within=5, message="the earlier Report read")
        # Reading it and comparing is one uninterrupted run of the writer: a rewrite would be counted by now.
        assert (store.puts, second.writes) == (1, 0)
    finally:
        await second.close()


async def test_submit_never_waits_for_a_stalled_api_and_delete_is_bounded() -> None:
    store = FakeReports()
    store.open.clear()
    reports = queue(store)
    async with asyncio.timeout(0.1):  # far below api_timeout: submit only folds the step into memory
        for _ in range(50):
            await reports.submit([update("db-0", cycle_report(action(1)))], ["db-0"], None, False)
    async with asyncio.timeout(FAST.api_timeout * 2 + 1):
        await reports.delete()  # the API never answers: gives up within its bound, raises nothing
    store.open.set()
    assert store.puts == 0


async def test_delete_removes_the_report() -> None:
    store = FakeReports()
    reports = queue(store)
    await reports.submit([update("db-0", cycle_report())], ["db-0"], None, False)
    await wait_for_async(lambda: store.puts == 1, within=5, message="the Report")
    await reports.delete()
    assert store.objects == {}


async def test_a_report_of_the_same_name_that_is_not_pgwarden_s_is_neither_overwritten_nor_deleted() -> None:
    store = FakeReports()
    theirs = {"metadata": {"name": "reaper", "namespace": NS, "uid": "theirs"}, "results": [], "source": "kyverno"}
    store.objects[(NS, "reaper")] = copy.deepcopy(theirs)
    reports = queue(store)
    await reports.submit([update("db-0", cycle_report(action(1)))], ["db-0"], None, False)
    await wait_for_async(lambda: reports.foreign, within=5, message="the Report read and found foreign")
    await reports.delete()
    assert store.objects[(NS, "reaper")] == theirs
    assert store.puts == 0


async def test_delete_reads_an_earlier_process_report_it_never_wrote() -> None:
    store = FakeReports()
    first = queue(store)
    await first.submit([update("db-0", cycle_report())], ["db-0"], None, False)
    await wait_for_async(lambda: store.puts == 1, within=5, message="the Report")
    await first.close()
    await queue(store).delete()  # a new process, deleted before its first write: still removes it
    assert store.objects == {}
