"""`kubectl pgwarden status`: one row per policy and target, built from the policies' status alone.

It reads `PostgresPolicy` objects and nothing else (no pods, no Secrets, no database), so it needs only
`get`/`list` on the policies and works with any kubeconfig that can list them. The rows are a pure function
of the objects read (`rows`), apart from the API call (`list_policies`), so the table is testable offline.
Field names come from the status the enforcers write (`pgwarden.enforcement.status`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client

from pgwarden.policy.api import GROUP, PLURAL, VERSION, ConditionType
from pgwarden.policy.model import EnforcementAction

NO_VALUE = "-"
ERROR_COLUMN_CHARS = 80
"""The table cuts a target's error to this (status keeps up to 1,000 characters; `-o json` prints them whole)."""

HEADERS = (
    "NAMESPACE",
    "POLICY",
    "MODE",
    "READY",
    "POD",
    "ENFORCER",
    "BACKENDS",
    "CLIENT STATES",
    "LAST ACTIONS",
    "LAST ACTION",
    "SKIPPED",
    "ERROR",
)


@dataclass(frozen=True)
class StatusRow:
    """One target of one policy (or the policy alone, when it has no target), as status reports it."""

    namespace: str
    policy: str
    mode: str
    """`enforce` or `dry run`, from spec.enforcementAction."""
    ready: str
    """The Ready condition: `True`, `False (Reason)`, or `Unknown` before any status was written."""
    pod: str | None = None
    enforcer: str | None = None
    backends: dict[str, int] = field(default_factory=dict)
    client_states: dict[str, int] = field(default_factory=dict)
    last_actions: list[dict[str, Any]] = field(default_factory=list)
    last_action_time: str | None = None
    last_cycle_time: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    """The target's error, its skippedReason, or for a policy without targets a failing condition's message."""

    def to_json(self) -> dict[str, Any]:
        return {_camel(k): v for k, v in asdict(self).items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def list_policies(api: client.ApiClient, namespace: str | None) -> list[dict[str, Any]]:
    """Every PostgresPolicy in `namespace` (all namespaces for None), sorted by namespace and name."""
    custom = client.CustomObjectsApi(api)
    if namespace is None:
        listing = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    else:
        listing = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    items = [cast(dict[str, Any], item) for item in cast(dict[str, Any], listing).get("items") or []]
    return sorted(items, key=lambda p: (p["metadata"].get("namespace", ""), p["metadata"]["name"]))


def mode_of(policy: Mapping[str, Any]) -> str:
    action = (policy.get("spec") or {}).get("enforcementAction")
    return "dry run" if action == EnforcementAction.DRY_RUN else "enforce"


def ready_of(policy: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    """The Ready column and the condition it comes from."""
    for condition in (policy.get("status") or {}).get("conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == ConditionType.READY:
            status = str(condition.get("status", "Unknown"))
            return (status if status == "True" else f"{status} ({condition.get('reason', '')})"), condition
    return "Unknown", None


def rows(policies: Iterable[Mapping[str, Any]]) -> list[StatusRow]:
    out: list[StatusRow] = []
    for policy in policies:
        meta = policy.get("metadata") or {}
        ready, condition = ready_of(policy)
        base = {
            "namespace": str(meta.get("namespace", "")),
            "policy": str(meta.get("name", "")),
            "mode": mode_of(policy),
        }
        targets = [t for t in (policy.get("status") or {}).get("targets") or [] if isinstance(t, Mapping)]
        if not targets:
            failing = condition is not None and condition.get("status") != "True"
            error = str(condition.get("message")) if failing and condition is not None else None
            out.append(StatusRow(base["namespace"], base["policy"], base["mode"], ready, error=error))
        out.extend(_target_row(base, ready, t) for t in targets)
    return out


def _target_row(base: Mapping[str, str], ready: str, target: Mapping[str, Any]) -> StatusRow:
    return StatusRow(
        namespace=base["namespace"],
        policy=base["policy"],
        mode=base["mode"],
        ready=ready,
        pod=str(target.get("pod")),
        enforcer=target.get("enforcer"),
        backends=dict(target.get("backends") or {}),
        client_states=dict(target.get("clientStates") or {}),
        last_actions=[dict(a) for a in target.get("lastActions") or [] if isinstance(a, Mapping)],
        last_action_time=target.get("lastActionTime"),
        last_cycle_time=target.get("lastCycleTime"),
        skipped=dict(target.get("skipped") or {}),
        error=target.get("error") or target.get("skippedReason"),
    )


# -- rendering ---------------------------------------------------------------------------------------------


def counts(values: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items()) or NO_VALUE


def actions_summary(actions: Iterable[Mapping[str, Any]]) -> str:
    """`terminate 3 (idle)`, `would terminate 2 (idle)`: the last acting cycle's actions by kind and rule."""
    kinds = Counter(
        (("" if a.get("done") else "would ") + str(a.get("action", "?")), str(a.get("rule", "?"))) for a in actions
    )
    return "; ".join(f"{verb} {n} ({rule})" for (verb, rule), n in sorted(kinds.items())) or NO_VALUE


def age(timestamp: str | None, now: datetime) -> str:
    """`5m ago` from an RFC 3339 time, in kubectl's AGE style (s, m, h, d)."""
    if not timestamp:
        return NO_VALUE
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _cut(text: str | None, limit: int) -> str:
    if not text:
        return NO_VALUE
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def table(headers: Iterable[str], cells: list[list[str]]) -> str:
    """Columns padded to their widest cell, separated by three spaces (kubectl's layout)."""
    heads = list(headers)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [heads, *cells]]
    return "\n".join(lines)


def render(status_rows: list[StatusRow], now: datetime | None = None) -> str:
    moment = now or datetime.now(UTC)
    cells = [
        [
            r.namespace,
            r.policy,
            r.mode,
            r.ready,
            r.pod or NO_VALUE,
            r.enforcer or NO_VALUE,
            counts(r.backends),
            counts(r.client_states),
            actions_summary(r.last_actions),
            age(r.last_action_time, moment),
            counts(r.skipped),
            _cut(r.error, ERROR_COLUMN_CHARS),
        ]
        for r in status_rows
    ]
    return table(HEADERS, cells)
