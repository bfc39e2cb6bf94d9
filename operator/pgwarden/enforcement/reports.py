"""A policy's openreports `Report`, computed from the enforcement loop's outcomes: pure functions, no API calls.

One namespaced Report per policy (same name, owned by it), one result per rule and pod: `fail` when the
rule's last evaluation on that pod acted on sessions (or would have, in dry run), `warn` when it chose
sessions but left them all alone, `pass` when it matched nothing; one `error` result for a pod that could
not be evaluated, and one `skip` result for a pod its sidecar enforces. Results are the *last* evaluation's
verdict, like the policy's status, so a reaped session shows as `fail` until the next quiet evaluation.

The writer (report_queue.py) writes only when `differs` says the content changed: timestamps say when a
result last changed, so a quiet cluster sees no write at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgwarden.enforcement.status import PolicyCondition, TargetUpdate, privilege_error
from pgwarden.engine.report import CycleReport
from pgwarden.policy.api import (
    API_VERSION,
    KIND,
    REPORT_KIND,
    REPORT_OMITTED_ANNOTATION,
    REPORT_POLICY_LABEL,
    REPORT_SOURCE,
    REPORTS_API_VERSION,
    ReportResult,
)
from pgwarden.policy.model import PolicySpec, SessionAction

MAX_MESSAGE_CHARS = 1000
"""A result's message is cut to this (server errors can be long; the log and status have them)."""
MAX_PIDS = 20
"""Process ids listed in one result's message at most (the rest are counted)."""
MAX_REPORT_BYTES = 512 * 1024
"""A Report's results are kept under about this much JSON: etcd refuses objects over ~1.5 MiB, and dashboards
read the whole object. Measured: ~330 bytes per result, so 200 pods x 10 rules (~650 KB) needs `_fit`."""
RESULT_OVERHEAD = 270
"""Bytes of one result's compact JSON (as stored) besides its names and message (keys, timestamp, properties):
the estimate `_fit` uses, so no result is serialised just to be measured."""
DROP_FIRST = (ReportResult.PASS, ReportResult.SKIP, ReportResult.WARN)
"""What a Report too large leaves out first: the least news first; `fail` and `error` are kept longest."""
SUMMARY_KEYS = tuple(r.value for r in ReportResult)
MANAGED_BY = {"app.kubernetes.io/managed-by": REPORT_SOURCE}


def rule_names(spec: PolicySpec) -> list[str]:
    """The rules a Report has a result for on each pod: session rules, then connection limits, as written."""
    return [rule.name for rule in spec.sessions] + [limit.name for limit in spec.connection_limits]


@dataclass
class ReportState:
    """The latest outcome per pod, folded from what the loop hands to its status sink step by step."""

    outcomes: dict[str, TargetUpdate] = field(default_factory=dict)
    policy_error: str | None = None
    """Why nothing could be evaluated at all (an invalid spec): reported when no pod is."""

    def apply(self, updates: Iterable[TargetUpdate], owned: Iterable[str], condition: PolicyCondition | None) -> None:
        """Fold one step in. Pods neither owned nor named as skipped in this step are gone from the policy.

        A condition with status False (credentials unusable, spec invalid) means no owned pod was evaluated:
        each becomes an `error` with the condition's message until an evaluation says otherwise.
        """
        updates = list(updates)
        keep = set(owned) | {u.pod for u in updates if u.skipped_reason}
        self.outcomes = {pod: outcome for pod, outcome in self.outcomes.items() if pod in keep}
        for update in updates:
            if update.report is not None or update.error or update.skipped_reason:
                self.outcomes[update.pod] = update  # released/writing records alone say nothing about rules
        self.policy_error = None
        if condition is not None and condition.status == "False":
            self.policy_error = condition.message
            for pod in owned:
                self.outcomes[pod] = TargetUpdate(pod, None, "", error=condition.message)


def report_body(
    namespace: str,
    policy: Mapping[str, Any],
    rules: list[str],
    state: ReportState,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole Report for `policy` (its body: metadata.name and uid are read). Results that say what
    `previous` already said keep its timestamp, so `differs` sees no change on a quiet cluster."""
    meta = policy.get("metadata") or {}
    name = str(meta.get("name"))
    kept = _timestamps(previous)
    results = [
        _stamped(result, kept)
        for pod in sorted(state.outcomes)
        for result in _pod_results(namespace, name, rules, state.outcomes[pod])
    ]
    if not state.outcomes and state.policy_error:
        results.append(_stamped(_result(name, None, ReportResult.ERROR, state.policy_error, None, ""), kept))
    owner = {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": meta.get("uid"), "controller": True}
    counts = summary(results)
    results, omitted = _fit(results)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**MANAGED_BY, REPORT_POLICY_LABEL: name},
        # Garbage collection removes the Report with its policy; blockOwnerDeletion would need update
        # rights on the policy's finalizers, and nothing needs the Report gone first.
        "ownerReferences": [{k: v for k, v in owner.items() if v is not None}],
    }
    if omitted:
        metadata["annotations"] = {REPORT_OMITTED_ANNOTATION: str(omitted)}
    return {
        "apiVersion": REPORTS_API_VERSION,
        "kind": REPORT_KIND,
        "metadata": metadata,
        "source": REPORT_SOURCE,
        "summary": counts,
        "results": results,
    }


def _fit(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The results that fit MAX_REPORT_BYTES, and how many were left out: `pass`, then `skip`, then `warn`
    results go first; what must still go is cut from the end (pods in name order)."""
    sizes = [_estimate(r) for r in results]
    total = sum(sizes)
    if total <= MAX_REPORT_BYTES:
        return results, 0
    dropped: set[int] = set()
    for verdict in DROP_FIRST:
        for i, result in enumerate(results):
            if total <= MAX_REPORT_BYTES:
                break
            if result.get("result") == verdict:
                dropped.add(i)
                total -= sizes[i]
    kept, used = [], 0
    for i, result in enumerate(results):
        if i not in dropped and used + sizes[i] <= MAX_REPORT_BYTES:
            kept.append(result)
            used += sizes[i]
    return kept, len(results) - len(kept)


def _estimate(result: Mapping[str, Any]) -> int:
    """Bytes of the result's compact JSON, near enough (see RESULT_OVERHEAD)."""
    names = [result.get(k) for k in ("policy", "rule", "message")]
    names += [r.get(k) for r in result.get("resources") or [] for k in ("namespace", "name")]
    return RESULT_OVERHEAD + sum(len(str(n)) for n in names if n is not None)


def summary(results: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Counts of results by verdict, every key present (the CRD's printer columns read them)."""
    counts = Counter(str(r.get("result")) for r in results)
    return {key: counts.get(key, 0) for key in SUMMARY_KEYS}


def ours(report: Mapping[str, Any]) -> bool:
    """Whether a Report found under the policy's name is pgwarden's (its label), not another tool's or a
    person's that pgwarden must neither overwrite nor delete."""
    labels = (report.get("metadata") or {}).get("labels") or {}
    return bool(labels.get("app.kubernetes.io/managed-by") == REPORT_SOURCE)


def differs(written: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Whether `wanted` says something `written` (the Report as last written or read) does not."""
    if written is None:
        return True
    return _content(written) != _content(wanted)


def _content(report: Mapping[str, Any]) -> tuple[Any, ...]:
    meta = report.get("metadata") or {}
    return (
        report.get("source"),
        report.get("summary"),
        report.get("results") or [],
        meta.get("labels") or {},
        meta.get("annotations") or {},
        meta.get("ownerReferences") or [],
    )


def _pod_results(namespace: str, policy: str, rules: list[str], outcome: TargetUpdate) -> list[dict[str, Any]]:
    resource = {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": outcome.pod}
    if outcome.skipped_reason:
        return [_result(policy, None, ReportResult.SKIP, outcome.skipped_reason, resource, outcome.when)]
    error = outcome.error or privilege_error(outcome.report)
    if error or outcome.report is None:
        message = error or "not evaluated"
        return [_result(policy, None, ReportResult.ERROR, message, resource, outcome.when)]
    return [_rule_result(policy, rule, outcome.report, resource, outcome.when) for rule in rules]


def _rule_result(policy: str, rule: str, report: CycleReport, resource: dict[str, Any], when: str) -> dict[str, Any]:
    """One rule's verdict on one pod from its last cycle."""
    actions = [a for a in report.actions if a.rule == rule]
    skipped = [s for s in report.skipped if s.rule == rule]
    mode = report.enforcement_action.value
    if actions:
        verbs = Counter(a.action for a in actions)
        text = ", ".join(f"{_verb(kind, report.dry_run)} {count}" for kind, count in sorted(verbs.items()))
        message = f"{text} session(s): pid {_pids(a.pid for a in actions)}"
        if skipped:
            message += f"; {len(skipped)} more left alone ({_reasons(skipped)})"
        props = {"enforcementAction": mode, "sessions": str(len(actions)), "skipped": str(len(skipped))}
        return _result(policy, rule, ReportResult.FAIL, message, resource, when, props)
    if skipped:
        pids = _pids(s.pid for s in skipped)
        message = f"{len(skipped)} session(s) chosen but left alone ({_reasons(skipped)}): pid {pids}"
        props = {"enforcementAction": mode, "sessions": "0", "skipped": str(len(skipped))}
        return _result(policy, rule, ReportResult.WARN, message, resource, when, props)
    props = {"enforcementAction": mode, "sessions": "0", "skipped": "0"}
    return _result(policy, rule, ReportResult.PASS, "no session matched", resource, when, props)


def _verb(action: str, dry_run: bool) -> str:
    past: dict[str, str] = {SessionAction.TERMINATE: "terminated", SessionAction.CANCEL: "cancelled"}
    return f"would {action}" if dry_run else past.get(action, action)


def _pids(pids: Iterable[int]) -> str:
    listed = sorted(pids)
    more = len(listed) - MAX_PIDS
    return ", ".join(str(p) for p in listed[:MAX_PIDS]) + (f" and {more} more" if more > 0 else "")


def _reasons(skipped: Iterable[Any]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(Counter(s.reason for s in skipped).items()))


def _result(
    policy: str,
    rule: str | None,
    verdict: ReportResult,
    message: str,
    resource: dict[str, Any] | None,
    when: str,
    properties: dict[str, str] | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"source": REPORT_SOURCE, "policy": policy}
    if rule is not None:
        result["rule"] = rule
    result["result"] = verdict.value
    result["message"] = message[:MAX_MESSAGE_CHARS]
    if properties:
        result["properties"] = properties
    if resource is not None:
        result["resources"] = [resource]
    result["timestamp"] = _timestamp(when)
    return result


def _key(result: Mapping[str, Any]) -> tuple[Any, ...]:
    """A result without its timestamp: what it says. Key order ignored: the API server returns objects with
    their keys in its own order, and a result read back must match the one built. (Not a JSON dump: this runs
    for every result of every step that changes anything, on the loop every policy shares.)"""
    return (
        result.get("policy"),
        result.get("rule"),
        result.get("result"),
        result.get("message"),
        result.get("source"),
        tuple(sorted((result.get("properties") or {}).items())),
        tuple((r.get("kind"), r.get("namespace"), r.get("name")) for r in result.get("resources") or []),
    )


def _timestamps(previous: Mapping[str, Any] | None) -> dict[tuple[Any, ...], Any]:
    results = (previous or {}).get("results") or []
    return {_key(r): r["timestamp"] for r in results if isinstance(r, Mapping) and "timestamp" in r}


def _stamped(result: dict[str, Any], kept: Mapping[tuple[Any, ...], Any]) -> dict[str, Any]:
    """The result with the earlier timestamp when it says the same as before: it has not changed since."""
    earlier = kept.get(_key(result))
    return result if earlier is None else {**result, "timestamp": earlier}


def _timestamp(when: str) -> dict[str, int]:
    """The openreports timestamp (seconds and nanos since the epoch) of an RFC 3339 time; now if unparsable."""
    try:
        seconds = int(datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp())
    except ValueError:
        seconds = int(datetime.now().timestamp())
    return {"seconds": seconds, "nanos": 0}
