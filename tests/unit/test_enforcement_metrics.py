"""Metric series follow the reports: actions counted by mode, backend gauges added, zeroed and removed."""

from __future__ import annotations

import itertools
import time

from pgwarden.enforcement import metrics
from pgwarden.engine.autovacuum_plan import AutovacuumReport
from pgwarden.engine.report import SkipRecord
from pgwarden.policy.api import SkipReason
from pgwarden.policy.model import SessionAction
from tests.harness.reports import action, cycle_report

_namespaces = itertools.count()


def _namespace() -> str:
    return f"metrics-test-{next(_namespaces)}"


def _value(name: str, labels: dict[str, str]) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_actions_are_counted_by_rule_action_and_mode() -> None:
    ns = _namespace()
    report = cycle_report(action(1), action(2, done=False), action(3, rule="slow", kind=SessionAction.CANCEL))
    metrics.record_cycle(ns, "p", "db-0", report, 0.01)
    labels = {"namespace": ns, "policy": "p", "mode": "enforce"}
    assert _value("pgwarden_actions_total", {**labels, "rule": "idle", "action": "terminate"}) == 1
    assert _value("pgwarden_actions_total", {**labels, "rule": "slow", "action": "cancel"}) == 1
    dry = cycle_report(action(4, done=False), dry_run=True)
    metrics.record_cycle(ns, "p", "db-0", dry, 0.01)
    dry_labels = {"namespace": ns, "policy": "p", "mode": "dryRun", "rule": "idle", "action": "terminate"}
    assert _value("pgwarden_actions_total", dry_labels) == 1


def test_autovacuum_stops_are_counted_and_a_dry_run_counts_what_it_would_stop() -> None:
    ns = _namespace()
    capped = AutovacuumReport(desired=2, cancelled=[11, 12])
    metrics.record_cycle(ns, "p", "db-0", cycle_report(autovacuum=capped), 0.01)
    would = AutovacuumReport(desired=2, dry_run=True, would_cancel=[13])
    metrics.record_cycle(ns, "p", "db-0", cycle_report(autovacuum=would, dry_run=True), 0.01)
    labels = {"namespace": ns, "policy": "p", "rule": "autovacuum", "action": "cancel"}
    assert _value("pgwarden_actions_total", {**labels, "mode": "enforce"}) == 2
    assert _value("pgwarden_actions_total", {**labels, "mode": "dryRun"}) == 1


def test_backend_series_are_added_zeroed_when_a_type_is_gone_and_removed_with_the_target() -> None:
    ns = _namespace()

    def backends(pod: str, backend_type: str) -> float | None:
        labels = {"namespace": ns, "policy": "p", "pod": pod, "backend_type": backend_type}
        return _value("pgwarden_backends", labels)

    metrics.record_cycle(ns, "p", "db-0", cycle_report(backends={"client backend": 3, "autovacuum worker": 1}), 0.01)
    metrics.record_cycle(ns, "p", "db-1", cycle_report(backends={"client backend": 5}), 0.01)
    assert (backends("db-0", "client backend"), backends("db-0", "autovacuum worker")) == (3, 1)
    metrics.record_cycle(ns, "p", "db-0", cycle_report(backends={"client backend": 4}), 0.01)
    assert (backends("db-0", "client backend"), backends("db-0", "autovacuum worker")) == (4, 0)
    metrics.forget_target(ns, "p", "db-0")
    assert backends("db-0", "client backend") is None
    assert backends("db-0", "autovacuum worker") is None
    assert backends("db-1", "client backend") == 5


def test_skipped_sessions_are_counted_by_rule_and_reason() -> None:
    ns = _namespace()
    skipped = (
        SkipRecord("idle", 5, SkipReason.MAX_ACTIONS),
        SkipRecord("idle", 6, SkipReason.MAX_ACTIONS),
        SkipRecord("idle", 7, SkipReason.GONE),
        SkipRecord("slow", 8, SkipReason.NOT_PERMITTED),
    )
    metrics.record_cycle(ns, "p", "db-0", cycle_report(action(1), skipped=skipped), 0.01)
    metrics.record_cycle(ns, "p", "db-1", cycle_report(skipped=skipped[:1]), 0.01)

    def skipped_total(rule: str, reason: str) -> float | None:
        return _value("pgwarden_skipped_total", {"namespace": ns, "policy": "p", "rule": rule, "reason": reason})

    assert skipped_total("idle", SkipReason.MAX_ACTIONS) == 3
    assert skipped_total("idle", SkipReason.GONE) == 1
    assert skipped_total("slow", SkipReason.NOT_PERMITTED) == 1
    assert skipped_total("slow", SkipReason.MAX_ACTIONS) is None


PER_TARGET_METRICS = {
    "pgwarden_backends",
    "pgwarden_client_sessions",
    "pgwarden_target_errors",
    "pgwarden_target_up",
    "pgwarden_last_success_timestamp_seconds",
    "pgwarden_missing_privileges",
}
"""Every metric labelled by pod (README's metrics table)."""
PER_POLICY_METRICS = PER_TARGET_METRICS | {
    "pgwarden_actions",
    "pgwarden_skipped",
    "pgwarden_cycle_duration_seconds",
    "pgwarden_policy_pass_duration_seconds",
    "pgwarden_policy_pass_targets",
    "pgwarden_targets",
    "pgwarden_policy_interval_seconds",
    "pgwarden_policy_ready",
}
"""Every metric labelled by policy."""


def _series_of(namespace: str) -> list[tuple[str, tuple[str, ...]]]:
    """Every labelled series of the namespace, in every pgwarden metric, as exported: (metric, labels after
    the namespace: policy, pod, ...)."""
    return [
        (family.name, tuple(sample.labels.values())[1:])
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("namespace") == namespace
    ]


def test_a_gone_pod_and_a_gone_policy_leave_no_series_behind() -> None:
    namespace = _namespace()
    skipped = (SkipRecord("idle", 9, SkipReason.MAX_ACTIONS),)
    for policy in ("p", "q"):
        for pod in ("db-0", "db-1"):
            metrics.record_cycle(namespace, policy, pod, cycle_report(action(7), skipped=skipped), 0.1)
            metrics.record_error(namespace, policy, pod)
            metrics.record_cycle(namespace, policy, pod, cycle_report(missing_privileges=("pg_signal_backend",)), 0.1)
        metrics.record_pass(namespace, policy, 2, 0.2)
        metrics.TARGETS.labels(namespace, policy).set(2)
        metrics.record_interval(namespace, policy, 30.0)
        metrics.record_ready(namespace, policy, False)
    assert {name for name, labels in _series_of(namespace) if labels[:2] == ("p", "db-1")} >= PER_TARGET_METRICS
    metrics.forget_target(namespace, "p", "db-1")
    assert not [s for s in _series_of(namespace) if s[1][:2] == ("p", "db-1")]
    assert _value("pgwarden_target_errors_total", {"namespace": namespace, "policy": "p", "pod": "db-0"}) == 1
    metrics.forget_policy(namespace, "p")
    left = _series_of(namespace)
    assert left
    assert {labels[0] for _, labels in left} == {"q"}  # the other policy's series are untouched
    assert {name for name, _ in left} == PER_POLICY_METRICS
    metrics.forget_policy(namespace, "q")
    assert _series_of(namespace) == []


def test_client_states_are_gauged_per_target_and_a_state_gone_drops_to_zero() -> None:
    ns = _namespace()

    def sessions(state: str) -> float | None:
        return _value("pgwarden_client_sessions", {"namespace": ns, "policy": "p", "pod": "db-0", "state": state})

    report = cycle_report()
    report.client_states = {"idle": 2, "active": 1, "idle in transaction": 4}
    metrics.record_cycle(ns, "p", "db-0", report, 0.01)
    assert (sessions("idle"), sessions("active"), sessions("idle in transaction")) == (2, 1, 4)
    report.client_states = {"idle": 1}
    metrics.record_cycle(ns, "p", "db-0", report, 0.01)
    assert (sessions("idle"), sessions("active"), sessions("idle in transaction")) == (1, 0, 0)


def test_a_target_is_up_with_its_last_success_time_until_a_cycle_fails() -> None:
    ns = _namespace()
    labels = {"namespace": ns, "policy": "p", "pod": "db-0"}
    before = time.time()
    metrics.record_cycle(ns, "p", "db-0", cycle_report(), 0.01)
    success = _value("pgwarden_last_success_timestamp_seconds", labels)
    assert success is not None
    assert before <= success <= time.time()
    assert _value("pgwarden_target_up", labels) == 1
    metrics.record_error(ns, "p", "db-0")
    assert _value("pgwarden_target_up", labels) == 0
    # An interrupted cycle counts its signals, but neither brings the target up nor moves its last success.
    metrics.record_cycle(ns, "p", "db-0", cycle_report(action(1)), 0.01, completed=False)
    assert _value("pgwarden_target_up", labels) == 0
    assert _value("pgwarden_last_success_timestamp_seconds", labels) == success
    acted = {"namespace": ns, "policy": "p", "rule": "idle", "action": "terminate", "mode": "enforce"}
    assert _value("pgwarden_actions_total", acted) == 1
    metrics.record_cycle(ns, "p", "db-0", cycle_report(), 0.01)
    assert _value("pgwarden_target_up", labels) == 1


def test_missing_privileges_are_counted_per_target_and_clear_when_granted() -> None:
    ns = _namespace()
    labels = {"namespace": ns, "policy": "p", "pod": "db-0"}
    missing = ("pg_read_all_stats", "pg_signal_backend")
    metrics.record_cycle(ns, "p", "db-0", cycle_report(missing_privileges=missing), 0.01)
    assert _value("pgwarden_missing_privileges", labels) == 2
    metrics.record_cycle(ns, "p", "db-0", cycle_report(), 0.01)
    assert _value("pgwarden_missing_privileges", labels) == 0


def test_policy_interval_and_readiness_are_gauged() -> None:
    ns = _namespace()
    labels = {"namespace": ns, "policy": "p"}
    metrics.record_interval(ns, "p", 15.0)
    metrics.record_ready(ns, "p", True)
    assert (_value("pgwarden_policy_interval_seconds", labels), _value("pgwarden_policy_ready", labels)) == (15, 1)
    metrics.record_ready(ns, "p", False)
    assert _value("pgwarden_policy_ready", labels) == 0
