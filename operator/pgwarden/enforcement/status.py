"""What a policy's status says, computed from engine reports: pure functions, no API calls.

Several writers share one policy's status (the controller, and sidecars in their own pods), so every
writer changes only its own `targets[]` entries, adds its own actions to `totals`, and recomputes the
summary fields (`conditions`, `targetCount`, `readyTargets`) from the whole target list it read. The
writer (status_writer.py) makes that read-modify-write safe with a resourceVersion precondition.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgwarden.engine.report import ActionRecord, CycleReport
from pgwarden.policy.api import ConditionReason, ConditionStatus, ConditionType
from pgwarden.policy.model import SessionAction

MAX_LAST_ACTIONS = 20
"""lastActions keeps at most this many per target: the newest (the last the cycle signalled)."""
MAX_ERROR_CHARS = 1000
"""A target's `error` is cut to this many characters (server messages can be long; the log has them whole)."""
MAX_STATUS_BYTES = 200 * 1024
"""The status, as compact JSON, is kept under this: 256 KiB with room for the policy's spec and metadata
(etcd refuses objects over ~1.5 MiB; a policy object is read on every cycle of every sidecar and watch).
Measured: a target entry with 20 actions and a long error is ~5.5 KB, so 1,000 acting targets need the
compaction steps of `fit_status`."""
TIMESTAMP_FIELDS = frozenset({"lastCycleTime", "lastTransitionTime"})
# Process counts move on any live server (sessions come and go, flip between idle and active; a server
# shared by several policies or pods sees pgwarden's own connections flip). As gauges they are exported
# exactly (pgwarden_backends); in the status they are a snapshot refreshed with the heartbeat, or with the
# next write that says something new, never a reason to write by themselves: that would be a write per cycle.
COUNT_FIELDS = frozenset({"backends", "clientStates", "runningWorkers"})
VOLATILE_FIELDS = TIMESTAMP_FIELDS | COUNT_FIELDS | {"writes"}  # a write id alone is no news
TOTAL_KEYS = ("actions", "terminated", "cancelled", "autovacuumCancelled")
# Every engine `errors` entry about a missing grant starts with this (pgwarden.engine.cycle says so; this
# pure module does not import the engine's I/O modules to learn it).
INSUFFICIENT_PRIVILEGES_PREFIX = f"{ConditionReason.INSUFFICIENT_PRIVILEGES}: "


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class TargetUpdate:
    """One target's outcome in one cycle, as the writer will record it."""

    pod: str
    pod_ip: str | None
    enforcer: str
    report: CycleReport | None = None
    error: str | None = None
    skipped_reason: str | None = None
    released: bool = False
    """The autovacuum value pgwarden wrote here was released (reset, or found gone): its record is dropped."""
    writing: int | None = None
    """The autovacuum value pgwarden is about to write here: recorded before the write (see WriteAhead)."""
    when: str = field(default_factory=now_rfc3339)

    def entry(self, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        """The `status.targets[]` item; keeps the last actions of an earlier cycle if this one did none."""
        entry: dict[str, Any] = {"pod": self.pod, "enforcer": self.enforcer, "lastCycleTime": self.when}
        if self.pod_ip:
            entry["podIP"] = self.pod_ip
        if self.skipped_reason:
            entry["skippedReason"] = self.skipped_reason
            return entry
        error = self.error or privilege_error(self.report)
        if error:
            entry["error"] = _cut(error, MAX_ERROR_CHARS)
        for key in ("lastActions", "lastActionTime", "serverVersion", "backends", "clientStates", "autovacuum"):
            if previous and key in previous:
                entry[key] = previous[key]
        if self.report is not None:
            entry.update(_report_fields(self.report, self.when))
            # Per-session problems in the report (e.g. PostgreSQL refusing to signal a superuser's session)
            # are logged and reported by the engine; the target itself was evaluated, so it is not failing.
            # A missing grant is different: the target cannot do its job at all (privilege_error).
        self._carry_written(entry, previous)
        return {k: v for k, v in entry.items() if v is not None}

    def _carry_written(self, entry: dict[str, Any], previous: Mapping[str, Any] | None) -> None:
        """Keep `autovacuum.written` ({value, time}: what pgwarden last wrote with ALTER SYSTEM here) across
        cycles until it is released: it is the only record of what the finalizer, the removal of
        spec.autovacuum or the deselection of the pod must reset. Each cycle's report replaces the rest."""
        record = written_record(previous)
        autovacuum = self.report.autovacuum if self.report is not None else None
        if autovacuum is not None and autovacuum.written and not autovacuum.dry_run:
            record = {"value": autovacuum.desired, "time": self.when}
        if self.writing is not None:
            record = {"value": self.writing, "time": self.when}
        if self.released:
            record = None
            if autovacuum is None:
                entry.pop("autovacuum", None)  # spec.autovacuum is gone: so is its last report
        if record is not None:
            entry["autovacuum"] = {**(entry.get("autovacuum") or {}), "written": record}
        elif isinstance(entry.get("autovacuum"), dict):
            entry["autovacuum"] = {k: v for k, v in entry["autovacuum"].items() if k != "written"}

    def totals(self) -> dict[str, int]:
        """Actions really taken in this cycle (dry-run actions are not counted)."""
        out = dict.fromkeys(TOTAL_KEYS, 0)
        if self.report is None:
            return out
        for action in self.report.actions:
            if not action.done:
                continue
            out["actions"] += 1
            out["terminated" if action.action == SessionAction.TERMINATE else "cancelled"] += 1
        autovacuum = self.report.autovacuum
        if autovacuum is not None and not autovacuum.dry_run:
            out["autovacuumCancelled"] += len(autovacuum.cancelled)
            out["actions"] += len(autovacuum.cancelled)
        return out


def privilege_error(report: CycleReport | None) -> str | None:
    """The target's error when the engine's role lacks a grant the policy needs, else None.

    Such a target was evaluated, but it cannot see or signal the sessions its rules are about: it is not
    doing its job, so it is reported like a failing target (error, Ready=False, Degraded=True), with the
    reason InsufficientPrivileges rather than TargetErrors so that the fix (a GRANT) is obvious.
    """
    if report is None or not report.missing_privileges:
        return None
    messages = [e for e in report.errors if e.startswith(INSUFFICIENT_PRIVILEGES_PREFIX)]
    return "; ".join(messages) or f"{INSUFFICIENT_PRIVILEGES_PREFIX}missing " + ", ".join(report.missing_privileges)


def written_record(target: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A `status.targets[]` item's `autovacuum.written`, if it is a well-formed record."""
    autovacuum = (target or {}).get("autovacuum")
    record = autovacuum.get("written") if isinstance(autovacuum, Mapping) else None
    if isinstance(record, Mapping) and isinstance(record.get("value"), int) and not isinstance(record["value"], bool):
        return dict(record)
    return None


@dataclass(frozen=True)
class WrittenRecord:
    """What one enforcer wrote on one pod: `autovacuum_max_workers = value`, at `time`."""

    pod: str
    value: int
    time: str


def written_records(status: Mapping[str, Any] | None, enforcer: str) -> dict[str, WrittenRecord]:
    """Pod -> what this kind of enforcer wrote there (autovacuum_max_workers), from a policy's status."""
    out: dict[str, WrittenRecord] = {}
    for target in (status or {}).get("targets") or []:
        record = written_record(target) if isinstance(target, Mapping) else None
        if record is not None and target.get("enforcer", enforcer) == enforcer and "pod" in target:
            pod = str(target["pod"])
            out[pod] = WrittenRecord(pod, int(record["value"]), str(record.get("time", "")))
    return out


def _report_fields(report: CycleReport, when: str) -> dict[str, Any]:
    """The report serialised into the fields of a `status.targets[]` item (the edge where JSON is written)."""
    fields: dict[str, Any] = {
        "serverVersion": report.server_version,
        "backends": dict(report.backends),
        "clientStates": dict(report.client_states),
    }
    if report.autovacuum is not None:
        fields["autovacuum"] = report.autovacuum.to_json()
    if report.skipped:
        # The last cycle's skips by reason; absent when it skipped nothing (limits, races, refusals).
        fields["skipped"] = dict(sorted(Counter(s.reason for s in report.skipped).items()))
    if report.actions:
        fields["lastActions"] = [_action_entry(a) for a in report.actions[-MAX_LAST_ACTIONS:]]  # the newest
        fields["lastActionTime"] = when
    return fields


def _action_entry(action: ActionRecord) -> dict[str, Any]:
    keys = ("rule", "action", "pid", "user", "database", "applicationName", "clientAddress", "state", "done")
    serialised = action.to_json()
    return {k: serialised[k] for k in keys if serialised.get(k) is not None}


@dataclass
class PolicyCondition:
    """A condition the writer asserts; lastTransitionTime is carried over when the status is unchanged."""

    type: ConditionType
    status: ConditionStatus
    reason: ConditionReason
    message: str


def next_status(
    current: Mapping[str, Any] | None,
    *,
    writer: str = "controller",
    generation: int | None,
    updates: Iterable[TargetUpdate],
    owned_pods: Iterable[str] | None = None,
    scope: Callable[[str], bool] | None = None,
    policy_condition: PolicyCondition | None = None,
    carried_totals: Mapping[str, int] | None = None,
    write: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The status after applying this writer's updates to `current`.

    `owned_pods`, when given, is the complete set of pods this writer enforces now: entries of its kind
    for other pods within its `scope` (gone, relabelled) are dropped. A sidecar's scope is its own pod,
    so it never drops a sibling's entry; the controller's scope is every pod.
    `policy_condition` overrides the computed Ready/Degraded (an invalid spec, missing credentials).
    `carried_totals` are the actions of updates folded away while the API server could not be written
    (see StatusQueue): they count in `totals` though their entries were superseded.
    `write` is (writer key, write id): recorded in `writes`, so a write whose answer was lost can be recognised.
    """
    # A shallow copy: nothing below changes a value of `current` in place (each entry, list and map that
    # changes is built anew), so the entries that do not change are shared, not copied. `current` is kopf's
    # body; deep-copying its 200 target entries on every pass cost more than the rest of this function.
    status: dict[str, Any] = dict(current or {})
    updates = list(updates)
    by_pod = {t["pod"]: t for t in status.get("targets") or [] if isinstance(t, dict) and "pod" in t}
    if owned_pods is not None:
        keep = set(owned_pods) | {u.pod for u in updates}
        for pod, entry in list(by_pod.items()):
            in_scope = scope is None or scope(pod)
            if in_scope and entry.get("enforcer") in (writer, None) and pod not in keep:
                del by_pod[pod]
    carried = carried_totals or {}
    totals = {k: int((status.get("totals") or {}).get(k, 0)) + int(carried.get(k, 0)) for k in TOTAL_KEYS}
    for update in updates:
        previous = by_pod.get(update.pod)
        if update.skipped_reason and previous and previous.get("enforcer") not in (None, update.enforcer):
            continue  # the pod's own enforcer reports on it; a skip notice must not overwrite that
        by_pod[update.pod] = update.entry(previous)
        for key, value in update.totals().items():
            totals[key] += value
    targets = [by_pod[pod] for pod in sorted(by_pod)]
    status["targets"] = targets
    _record_write(status, write, set(by_pod))
    status["totals"] = totals
    active = [t for t in targets if not t.get("skippedReason")]
    failing = [t for t in active if t.get("error")]
    status["targetCount"] = len(active)
    status["readyTargets"] = len(active) - len(failing)
    if generation is not None:
        status["observedGeneration"] = generation
    # Pods this writer enforces that have no entry yet (their first evaluation is in flight): they decide the
    # conditions only while no target has been evaluated, so they are counted only then.
    pending = 0 if active else len(set(owned_pods or ()) - set(by_pod))
    conditions = _conditions(active, failing, policy_condition, pending)
    status["conditions"] = _carry_transitions(status.get("conditions") or [], conditions, generation)
    return fit_status(status)


def write_key(writer: str, scope_pod: str | None = None) -> str:
    """The key of a writer in `status.writes`: the controller, or one pod's sidecar."""
    return f"{writer}/{scope_pod}" if scope_pod else writer


def last_write(status: Mapping[str, Any] | None, key: str) -> str | None:
    writes = (status or {}).get("writes")
    return str(writes[key]) if isinstance(writes, dict) and key in writes else None


def _record_write(status: dict[str, Any], write: tuple[str, str] | None, pods: set[str]) -> None:
    """Set this writer's id, and drop those of sidecars whose pod has no entry any more (bounded map)."""
    writes = dict(status.get("writes") or {})
    if write is not None:
        writes[write[0]] = write[1]
    for key in [k for k in writes if "/" in k and k.split("/", 1)[1] not in pods]:
        if write is None or key != write[0]:
            del writes[key]
    if writes:
        status["writes"] = writes
    else:
        status.pop("writes", None)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_size(status: Mapping[str, Any]) -> int:
    """Bytes of the status as the API server stores it (compact JSON; close enough for a budget)."""
    return len(json.dumps(status, separators=(",", ":"), ensure_ascii=False).encode())


# Successively smaller target entries, applied to every target until the status fits: first fewer
# lastActions and shorter errors, then no lastActions and no per-server counts (the metrics have them
# exactly), then only what says which pod is enforced by whom, when, and why it fails. Totals, conditions
# and the autovacuum report (release relies on what it says was written) are never dropped.
_COMPACTION_STEPS: tuple[tuple[int | None, int, frozenset[str]], ...] = (
    (5, 300, frozenset()),
    (0, 200, frozenset({"backends", "clientStates", "skipped"})),
    (0, 80, frozenset({"backends", "clientStates", "skipped", "serverVersion", "lastActionTime"})),
)


def fit_status(status: dict[str, Any], limit: int = MAX_STATUS_BYTES) -> dict[str, Any]:
    """`status`, its target entries compacted step by step until it is under `limit` bytes.

    A status over the limit is what made a policy with ~280 acting targets pass etcd's object limit, after
    which every write failed and the loop crashed. The last step leaves ~210 bytes a target (measured with
    StatefulSet pod names and failing targets), so 1,000 targets take ~208 KiB, under 256 KiB; a status
    still too large (tens of thousands of targets) is written as is, and a refusal
    by the API server is handled by the writer (StatusWriter falls back to `compact_status`).
    """
    if status_size(status) <= limit:
        return status
    for actions, error_chars, dropped in _COMPACTION_STEPS:
        status["targets"] = [_compact_entry(t, actions, error_chars, dropped) for t in status.get("targets") or []]
        if status_size(status) <= limit:
            break
    return status


def compact_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest form of `status` (the last compaction step on every target): what the writer falls
    back to when the API server refuses a write as too large."""
    actions, error_chars, dropped = _COMPACTION_STEPS[-1]
    out = dict(status)
    out["targets"] = [_compact_entry(t, actions, error_chars, dropped) for t in status.get("targets") or []]
    return out


def _compact_entry(entry: Mapping[str, Any], actions: int | None, error_chars: int, dropped: frozenset[str]) -> Any:
    if not isinstance(entry, Mapping):
        return entry
    out = {k: v for k, v in entry.items() if k not in dropped}
    if actions is not None and "lastActions" in out:
        kept = list(out["lastActions"])[-actions:] if actions else []
        if kept:
            out["lastActions"] = kept
        else:
            del out["lastActions"]
    if isinstance(out.get("error"), str):
        out["error"] = _cut(out["error"], error_chars)
    return out


def is_ready(status: Mapping[str, Any]) -> bool:
    """Whether a status's Ready condition is True (pgwarden_policy_ready; alerts fire on it being 0)."""
    for condition in status.get("conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == ConditionType.READY:
            return condition.get("status") == "True"
    return False


def _conditions(
    active: list[dict[str, Any]], failing: list[dict[str, Any]], override: PolicyCondition | None, pending: int = 0
) -> list[PolicyCondition]:
    if override is not None:
        degraded = PolicyCondition(ConditionType.DEGRADED, "True", override.reason, override.message)
        return [override, degraded] if override.type == ConditionType.READY else [override]
    if failing:
        detail = "; ".join(f"{t['pod']}: {t['error']}" for t in failing[:5])
        message = f"{len(failing)} of {len(active)} targets failed: {detail}"
        # InsufficientPrivileges only when that is all that is wrong: any other failure (unreachable,
        # authentication) comes first, since a GRANT would not fix it.
        only_grants = all(str(t["error"]).startswith(INSUFFICIENT_PRIVILEGES_PREFIX) for t in failing)
        reason = ConditionReason.INSUFFICIENT_PRIVILEGES if only_grants else ConditionReason.TARGET_ERRORS
        return _ready_and_degraded(False, reason, message)
    conflicts = [t for t in active if (t.get("autovacuum") or {}).get("conflictsWith")]
    if conflicts:
        detail = "; ".join(
            f"{t['pod']}: someone else wants a different autovacuum_max_workers "
            f"({', '.join(map(str, t['autovacuum']['conflictsWith']))})"
            for t in conflicts[:5]
        )
        return _ready_and_degraded(False, ConditionReason.AUTOVACUUM_CONFLICT, f"pgwarden does not write it: {detail}")
    if not active and pending:
        # Not Ready until something was evaluated: a new policy's first write (its first pass still in flight)
        # once said Ready=True "no running pod matches", and a GitOps health check took that for done.
        # Nothing failed, so not Degraded either.
        message = f"{pending} selected targets, none evaluated yet"
        return _ready_and_degraded(False, ConditionReason.TARGETS_PENDING, message, degraded=False)
    if not active:
        return _ready_and_degraded(True, ConditionReason.NO_TARGETS, "no running pod matches spec.selector")
    return _ready_and_degraded(True, ConditionReason.TARGETS_EVALUATED, f"all {len(active)} targets evaluated")


def _ready_and_degraded(
    ready: bool, reason: ConditionReason, message: str, *, degraded: bool | None = None
) -> list[PolicyCondition]:
    """Ready and Degraded, for one reason: they disagree unless `degraded` says otherwise (pending targets:
    not Ready, and nothing failed)."""
    degraded = not ready if degraded is None else degraded
    return [
        PolicyCondition(ConditionType.READY, "True" if ready else "False", reason, message),
        PolicyCondition(ConditionType.DEGRADED, "True" if degraded else "False", reason, message),
    ]


def _carry_transitions(
    previous: list[dict[str, Any]], conditions: list[PolicyCondition], generation: int | None
) -> list[dict[str, Any]]:
    old = {c.get("type"): c for c in previous if isinstance(c, dict)}
    out = []
    for cond in conditions:
        before = old.pop(cond.type, None)
        changed = before is None or before.get("status") != cond.status
        item: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message[:2000],
            "lastTransitionTime": (
                before.get("lastTransitionTime", now_rfc3339()) if before and not changed else now_rfc3339()
            ),
        }
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    out.extend(old.values())  # conditions another writer asserts (none today) are left alone
    return sorted(out, key=lambda c: str(c.get("type")))


def without_timestamps(value: Any) -> Any:
    """`value` minus the fields that change every cycle (timestamps, counts), to tell a real change from a heartbeat."""
    if isinstance(value, Mapping):
        return {k: without_timestamps(v) for k, v in value.items() if k not in VOLATILE_FIELDS}
    if isinstance(value, list):
        return [without_timestamps(v) for v in value]
    return value


def differs(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """True when something other than a timestamp or a process count changed."""
    relevant = {k: v for k, v in (old or {}).items() if k != "kopf"}
    return bool(without_timestamps(relevant) != without_timestamps({k: v for k, v in new.items() if k != "kopf"}))
