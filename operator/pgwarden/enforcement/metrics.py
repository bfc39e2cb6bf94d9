"""Prometheus metrics: what the operator did and saw, labelled so a dashboard can slice by policy and pod."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

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
    PER_TARGET.seen(namespace, policy, pod, report, time.time() if completed else None)


class _TargetSeries:
    """One target's per-target gauges, as plain values: what 5 prometheus_client label children per
    metric would hold at ~800 bytes each (20 policies x 200 pods: ~44,000 children, ~35 MB)."""

    __slots__ = ("backends", "last_success", "missing", "states", "up")

    def __init__(self) -> None:
        self.backends: dict[str, int] = {}  # backend_type -> count; a type gone stays, at 0
        self.states: dict[str, int] = {}  # client state -> count; likewise
        self.up: int | None = None
        self.last_success: float | None = None
        self.missing: int | None = None


def _merge(seen: dict[str, int], counts: dict[str, int]) -> None:
    """The counts now; a key that is gone (an autovacuum worker that finished) drops to 0 instead of showing
    its last count forever (the series stays, as a gauge's child would)."""
    for label in seen:
        if label not in counts:
            seen[label] = 0
    seen.update(counts)


class PerTargetGauges:
    """pgwarden_backends, pgwarden_client_sessions, pgwarden_target_up, pgwarden_last_success_timestamp_seconds
    and pgwarden_missing_privileges: the gauges labelled by pod, exported from one small record per target.

    Same names, labels, help and values as prometheus_client Gauges would give; the memory is ~1/10 (see
    `_TargetSeries`). Written by the event loop, read by the metrics server's thread: both hold the lock.
    """

    def __init__(self) -> None:
        self._targets: dict[tuple[str, str, str], _TargetSeries] = {}
        self._lock = threading.Lock()

    def seen(self, namespace: str, policy: str, pod: str, report: CycleReport, success: float | None) -> None:
        """A cycle's counts; `success` the time it completed (None: interrupted, so neither up nor moved)."""
        with self._lock:
            series = self._series((namespace, policy, pod))
            _merge(series.backends, report.backends)
            _merge(series.states, report.client_states)
            series.missing = len(report.missing_privileges)
            if success is not None:
                series.up, series.last_success = 1, success

    def failed(self, namespace: str, policy: str, pod: str) -> None:
        with self._lock:
            self._series((namespace, policy, pod)).up = 0

    def forget_target(self, namespace: str, policy: str, pod: str) -> None:
        with self._lock:
            self._targets.pop((namespace, policy, pod), None)

    def forget_policy(self, namespace: str, policy: str) -> None:
        with self._lock:
            for key in [k for k in self._targets if k[:2] == (namespace, policy)]:
                del self._targets[key]

    def _series(self, key: tuple[str, str, str]) -> _TargetSeries:
        series = self._targets.get(key)
        if series is None:
            series = self._targets[key] = _TargetSeries()
        return series

    def describe(self) -> Iterable[Metric]:
        """The families without samples: the registry learns the names (for `?name[]=`) without a scrape."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        backends, states, up, success, missing = families
        with self._lock:  # a copy of the values; the lock is held for a copy, never for the exposition
            rows = [
                (key, dict(s.backends), dict(s.states), s.up, s.last_success, s.missing)
                for key, s in self._targets.items()
            ]
        for key, backend_counts, state_counts, up_value, success_value, missing_value in rows:
            labels = list(key)
            for backend_type, count in backend_counts.items():
                backends.add_metric([*labels, backend_type], count)
            for state, count in state_counts.items():
                states.add_metric([*labels, state], count)
            if up_value is not None:
                up.add_metric(labels, up_value)
            if success_value is not None:
                success.add_metric(labels, success_value)
            if missing_value is not None:
                missing.add_metric(labels, missing_value)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        target = ["namespace", "policy", "pod"]
        return [
            GaugeMetricFamily(
                "pgwarden_backends",
                "PostgreSQL processes by backend_type on each target, as seen in the last cycle.",
                labels=[*target, "backend_type"],
            ),
            GaugeMetricFamily(
                "pgwarden_client_sessions",
                "Client backends by pg_stat_activity.state on each target (active, idle, idle in transaction, "
                "...), as seen in the last cycle.",
                labels=[*target, "state"],
            ),
            GaugeMetricFamily(
                "pgwarden_target_up",
                "1 when the last evaluation of a target completed, 0 when it failed (like Prometheus' own `up`).",
                labels=target,
            ),
            GaugeMetricFamily(
                "pgwarden_last_success_timestamp_seconds",
                "Unix time at which the last evaluation of a target completed: an enforcement that stalls shows "
                "as this falling behind time().",
                labels=target,
            ),
            GaugeMetricFamily(
                "pgwarden_missing_privileges",
                "Grants the engine's role lacks on a target for this policy (the InsufficientPrivileges reason), "
                "as found by the last cycle; 0 when it has them all.",
                labels=target,
            ),
        ]


PER_TARGET = PerTargetGauges()
REGISTRY.register(PER_TARGET)


def skip_counts(report: CycleReport) -> collections.Counter[tuple[str, str]]:
    """How many sessions each rule left alone, by reason: one label lookup per pair, not per session."""
    return collections.Counter((s.rule, s.reason) for s in report.skipped)


def record_pass(namespace: str, policy: str, targets: int, seconds: float) -> None:
    PASS_SECONDS.labels(namespace, policy).observe(seconds)
    PASS_TARGETS.labels(namespace, policy).set(targets)


def record_error(namespace: str, policy: str, pod: str) -> None:
    TARGET_ERRORS.labels(namespace, policy, pod).inc()
    PER_TARGET.failed(namespace, policy, pod)


def record_interval(namespace: str, policy: str, seconds: float) -> None:
    INTERVAL.labels(namespace, policy).set(seconds)


def record_ready(namespace: str, policy: str, ready: bool) -> None:
    READY.labels(namespace, policy).set(1 if ready else 0)


def forget_target(namespace: str, policy: str, pod: str) -> None:
    """Drop a departed pod's series so gauges never report a server that is gone, and no series (nor the
    memory behind it) outlives its pod: 5,000 pods created and deleted must leave nothing behind."""
    key = (namespace, policy, pod)
    PER_TARGET.forget_target(*key)
    for metric in _PER_TARGET:
        _remove_series(metric, lambda labels: labels[:3] == key)


def forget_policy(namespace: str, policy: str) -> None:
    """Drop every series of a policy that is gone (its loop ended): its counters would otherwise be exported,
    and held in memory, for the life of the process."""
    PER_TARGET.forget_policy(namespace, policy)
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
    CYCLE_SECONDS,
    PASS_SECONDS,
    PASS_TARGETS,
    TARGET_ERRORS,
    TARGETS,
    INTERVAL,
    READY,
)
# Every prometheus_client metric labelled (namespace, policy, pod, ...) in that order: what a departed pod
# leaves behind (the gauges of PER_TARGET go with its record).
_PER_TARGET: tuple[Gauge | Counter, ...] = (TARGET_ERRORS,)


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - metrics are scraped from other pods
    start_http_server(port, addr=addr, registry=REGISTRY)
