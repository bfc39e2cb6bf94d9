"""Prometheus metrics: what the operator did and saw, labelled so a dashboard can slice by policy and pod."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pgwarden.engine.report import CycleReport

REGISTRY = CollectorRegistry(auto_describe=True)

ACTIONS = Counter(
    "pgwarden_actions",
    "Sessions terminated or queries cancelled (dry run: that would have been).",
    ["namespace", "policy", "rule", "action", "mode"],
    registry=REGISTRY,
)
SKIPPED = Counter(
    "pgwarden_skipped",
    "Sessions a rule chose but pgwarden left alone, by reason (skipped[].reason: a blast-radius limit, the "
    "session gone or changed before the signal, PostgreSQL refusing it, ...).",
    ["namespace", "policy", "rule", "reason"],
    registry=REGISTRY,
)
BACKENDS = Gauge(
    "pgwarden_backends",
    "PostgreSQL processes by backend_type on each target, as seen in the last cycle.",
    ["namespace", "policy", "pod", "backend_type"],
    registry=REGISTRY,
)
CYCLE_SECONDS = Histogram(
    "pgwarden_cycle_duration_seconds",
    "Wall time of one evaluation of one policy on one target.",
    ["namespace", "policy"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
PASS_SECONDS = Histogram(
    "pgwarden_policy_pass_duration_seconds",
    "Wall time of one pass of a policy over the targets due together, status bookkeeping included "
    "(on a quiet cluster every target is due at once: one full cycle). Near `interval` means saturated.",
    ["namespace", "policy"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
PASS_TARGETS = Gauge(
    "pgwarden_policy_pass_targets",
    "Targets evaluated in the policy's last pass (with pgwarden_targets: was it a full cycle?).",
    ["namespace", "policy"],
    registry=REGISTRY,
)
TARGET_ERRORS = Counter(
    "pgwarden_target_errors",
    "Cycles that failed on a target (unreachable, bad credentials, timeout, query error).",
    ["namespace", "policy", "pod"],
    registry=REGISTRY,
)
TARGETS = Gauge(
    "pgwarden_targets",
    "Pods a policy currently targets.",
    ["namespace", "policy"],
    registry=REGISTRY,
)
CLIENT_SESSIONS = Gauge(
    "pgwarden_client_sessions",
    "Client backends by pg_stat_activity.state on each target (active, idle, idle in transaction, ...), as "
    "seen in the last cycle.",
    ["namespace", "policy", "pod", "state"],
    registry=REGISTRY,
)
TARGET_UP = Gauge(
    "pgwarden_target_up",
    "1 when the last evaluation of a target completed, 0 when it failed (like Prometheus' own `up`).",
    ["namespace", "policy", "pod"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "pgwarden_last_success_timestamp_seconds",
    "Unix time at which the last evaluation of a target completed: an enforcement that stalls shows as "
    "this falling behind time().",
    ["namespace", "policy", "pod"],
    registry=REGISTRY,
)
MISSING_PRIVILEGES = Gauge(
    "pgwarden_missing_privileges",
    "Grants the engine's role lacks on a target for this policy (the InsufficientPrivileges reason), as "
    "found by the last cycle; 0 when it has them all.",
    ["namespace", "policy", "pod"],
    registry=REGISTRY,
)
INTERVAL = Gauge(
    "pgwarden_policy_interval_seconds",
    "The policy's spec.interval: the longest gap between two evaluations of a target.",
    ["namespace", "policy"],
    registry=REGISTRY,
)
READY = Gauge(
    "pgwarden_policy_ready",
    "1 while the policy's Ready condition is True, 0 while it is False, as last computed for its status.",
    ["namespace", "policy"],
    registry=REGISTRY,
)


# The counts last exported, per target, so only changes are set and a vanished key drops to 0.
_backends_seen: dict[tuple[str, str, str], dict[str, int]] = {}
_states_seen: dict[tuple[str, str, str], dict[str, int]] = {}


def record_cycle(
    namespace: str, policy: str, pod: str, report: CycleReport, seconds: float, *, completed: bool = True
) -> None:
    """What one cycle did and saw; `completed` False for a cycle interrupted part way (its signals still
    count, but the target is not up and its last success does not move)."""
    mode = report.enforcement_action.value
    CYCLE_SECONDS.labels(namespace, policy).observe(seconds)
    for action in report.actions:
        if action.done or report.dry_run:
            ACTIONS.labels(namespace, policy, action.rule, action.action, mode).inc()
    for (rule, reason), count in skip_counts(report).items():
        SKIPPED.labels(namespace, policy, rule, reason).inc(count)
    autovacuum = report.autovacuum
    if autovacuum is not None:
        # A dry run counts what it would have stopped, as it does for sessions (the metric's help says so).
        stopped = autovacuum.would_cancel if autovacuum.dry_run else autovacuum.cancelled
        if stopped:
            ACTIONS.labels(namespace, policy, "autovacuum", "cancel", mode).inc(len(stopped))
    key = (namespace, policy, pod)
    _set_changed(BACKENDS, key, _backends_seen, report.backends)
    _set_changed(CLIENT_SESSIONS, key, _states_seen, report.client_states)
    MISSING_PRIVILEGES.labels(*key).set(len(report.missing_privileges))
    if completed:
        TARGET_UP.labels(*key).set(1)
        LAST_SUCCESS.labels(*key).set(time.time())


def _set_changed(
    gauge: Gauge, key: tuple[str, str, str], seen: dict[tuple[str, str, str], dict[str, int]], counts: dict[str, int]
) -> None:
    """Set the per-target counts that changed since last exported.

    Only what changed: 200 targets x ~8 backend types are 1,600 label lookups a cycle otherwise. A key
    that is gone (an autovacuum worker that finished) drops to 0 instead of showing its last count forever.
    """
    before = seen.get(key, {})
    now = dict(counts)
    for label in before.keys() | now.keys():
        if before.get(label) != now.get(label, 0):
            gauge.labels(*key, label).set(now.get(label, 0))
    seen[key] = now


def skip_counts(report: CycleReport) -> collections.Counter[tuple[str, str]]:
    """How many sessions each rule left alone, by reason: one label lookup per pair, not per session."""
    return collections.Counter((s.rule, s.reason) for s in report.skipped)


def record_pass(namespace: str, policy: str, targets: int, seconds: float) -> None:
    PASS_SECONDS.labels(namespace, policy).observe(seconds)
    PASS_TARGETS.labels(namespace, policy).set(targets)


def record_error(namespace: str, policy: str, pod: str) -> None:
    TARGET_ERRORS.labels(namespace, policy, pod).inc()
    TARGET_UP.labels(namespace, policy, pod).set(0)


def record_interval(namespace: str, policy: str, seconds: float) -> None:
    INTERVAL.labels(namespace, policy).set(seconds)


def record_ready(namespace: str, policy: str, ready: bool) -> None:
    READY.labels(namespace, policy).set(1 if ready else 0)


def forget_target(namespace: str, policy: str, pod: str) -> None:
    """Drop a departed pod's series so gauges never report a server that is gone, and no series (nor the
    memory behind it) outlives its pod: 5,000 pods created and deleted must leave nothing behind."""
    key = (namespace, policy, pod)
    _backends_seen.pop(key, None)
    _states_seen.pop(key, None)
    for metric in _PER_TARGET:
        _remove_series(metric, lambda labels: labels[:3] == key)


def forget_policy(namespace: str, policy: str) -> None:
    """Drop every series of a policy that is gone (its loop ended): its counters would otherwise be exported,
    and held in memory, for the life of the process."""
    for seen in (_backends_seen, _states_seen):
        for key in [k for k in seen if k[:2] == (namespace, policy)]:
            del seen[key]
    for metric in _PER_POLICY:
        _remove_series(metric, lambda labels: labels[:2] == (namespace, policy))


def _remove_series(metric: Counter | Gauge | Histogram, match: Callable[[tuple[str, ...]], bool]) -> None:
    # prometheus_client has no "remove by partial labels"; _metrics is its label-tuple -> child map.
    for labels in [labels for labels in list(metric._metrics) if match(tuple(labels))]:
        metric.remove(*labels)


# Every metric labelled (namespace, policy, ...) in that order.
_PER_POLICY: tuple[Counter | Gauge | Histogram, ...] = (
    ACTIONS,
    SKIPPED,
    BACKENDS,
    CYCLE_SECONDS,
    PASS_SECONDS,
    PASS_TARGETS,
    TARGET_ERRORS,
    TARGETS,
    CLIENT_SESSIONS,
    TARGET_UP,
    LAST_SUCCESS,
    MISSING_PRIVILEGES,
    INTERVAL,
    READY,
)
# Every metric labelled (namespace, policy, pod, ...) in that order: what a departed pod leaves behind.
_PER_TARGET: tuple[Gauge | Counter, ...] = (
    BACKENDS,
    CLIENT_SESSIONS,
    TARGET_ERRORS,
    TARGET_UP,
    LAST_SUCCESS,
    MISSING_PRIVILEGES,
)


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - metrics are scraped from other pods
    start_http_server(port, addr=addr, registry=REGISTRY)
