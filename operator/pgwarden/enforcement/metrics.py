"""Prometheus metrics: what the operator did and saw, labelled so a dashboard can slice by policy and pod."""

from __future__ import annotations

import collections
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


_backends_seen: dict[tuple[str, str, str], dict[str, int]] = {}  # the counts last exported, per target


def record_cycle(namespace: str, policy: str, pod: str, report: CycleReport, seconds: float) -> None:
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
    # Only what changed: 200 targets x ~8 backend types are 1,600 label lookups a cycle otherwise. A type
    # that is gone (an autovacuum worker that finished) drops to 0 instead of showing its last count forever.
    key = (namespace, policy, pod)
    before = _backends_seen.get(key, {})
    now = dict(report.backends)
    for backend_type in before.keys() | now.keys():
        if before.get(backend_type) != now.get(backend_type, 0):
            BACKENDS.labels(namespace, policy, pod, backend_type).set(now.get(backend_type, 0))
    _backends_seen[key] = now


def skip_counts(report: CycleReport) -> collections.Counter[tuple[str, str]]:
    """How many sessions each rule left alone, by reason: one label lookup per pair, not per session."""
    return collections.Counter((s.rule, s.reason) for s in report.skipped)


def record_pass(namespace: str, policy: str, targets: int, seconds: float) -> None:
    PASS_SECONDS.labels(namespace, policy).observe(seconds)
    PASS_TARGETS.labels(namespace, policy).set(targets)


def record_error(namespace: str, policy: str, pod: str) -> None:
    TARGET_ERRORS.labels(namespace, policy, pod).inc()


def forget_target(namespace: str, policy: str, pod: str) -> None:
    """Drop a departed pod's series so gauges never report a server that is gone, and no series (nor the
    memory behind it) outlives its pod: 5,000 pods created and deleted must leave nothing behind."""
    _backends_seen.pop((namespace, policy, pod), None)
    _remove_series(BACKENDS, lambda labels: labels[:3] == (namespace, policy, pod))
    _remove_series(TARGET_ERRORS, lambda labels: labels == (namespace, policy, pod))


def forget_policy(namespace: str, policy: str) -> None:
    """Drop every series of a policy that is gone (its loop ended): its counters would otherwise be exported,
    and held in memory, for the life of the process."""
    for key in [k for k in _backends_seen if k[:2] == (namespace, policy)]:
        del _backends_seen[key]
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
)


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - metrics are scraped from other pods
    start_http_server(port, addr=addr, registry=REGISTRY)
