"""Which pods a policy enforces on: running, addressed, not deleting, matching the selector, sorted."""

from __future__ import annotations

from typing import Any

from pgwarden.enforcement.targets import PodInfo, pod_info_from, select_targets
from pgwarden.policy import LabelSelector
from pgwarden.policy.api import ENFORCER_ANNOTATION, EnforcerKind


def _pod(name: str, labels: dict[str, str], **fields: Any) -> PodInfo:
    defaults: dict[str, Any] = {"phase": "Running", "pod_ip": "10.0.0.1", "deleting": False}
    defaults.update(fields)
    return PodInfo(name, "ns", defaults["phase"], defaults["pod_ip"], labels, {}, defaults["deleting"])


def _selector(raw: dict[str, Any]) -> LabelSelector:
    return LabelSelector.model_validate(raw)


def test_only_running_addressed_pods_that_are_not_deleting() -> None:
    pods = [
        _pod("db-3", {"app": "pg"}),
        _pod("db-1", {"app": "pg"}),
        _pod("pending", {"app": "pg"}, phase="Pending"),
        _pod("no-ip", {"app": "pg"}, pod_ip=None),
        _pod("leaving", {"app": "pg"}, deleting=True),
        _pod("other", {"app": "web"}),
    ]
    chosen = select_targets(_selector({"matchLabels": {"app": "pg"}}), pods)
    assert [p.name for p in chosen] == ["db-1", "db-3"]


def test_match_expressions_and_labels_together() -> None:
    pods = [
        _pod("primary", {"app": "pg", "role": "primary", "tier": "gold"}),
        _pod("replica", {"app": "pg", "role": "replica", "tier": "gold"}),
        _pod("untiered", {"app": "pg", "role": "primary"}),
        _pod("legacy", {"app": "pg", "role": "primary", "tier": "gold", "legacy": "yes"}),
    ]
    selector = _selector(
        {
            "matchLabels": {"app": "pg"},
            "matchExpressions": [
                {"key": "role", "operator": "In", "values": ["primary"]},
                {"key": "tier", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }
    )
    assert [p.name for p in select_targets(selector, pods)] == ["primary"]
    not_in = _selector({"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["primary"]}]})
    assert [p.name for p in select_targets(not_in, pods)] == ["replica"]


def test_no_selector_targets_nothing() -> None:
    assert select_targets(None, [_pod("db-0", {"app": "pg"})]) == []


def test_pod_info_keeps_labels_and_only_pgwarden_annotations() -> None:
    meta: dict[str, object] = {
        "labels": {"app": "pg"},
        "annotations": {ENFORCER_ANNOTATION: EnforcerKind.SIDECAR.value, "kubectl.kubernetes.io/restartedAt": "x"},
        "deletionTimestamp": "2026-01-01T00:00:00Z",
    }
    info = pod_info_from("db-0", "ns", meta, {"phase": "Running", "podIP": "10.0.0.9"})
    assert info.labels == {"app": "pg"}
    assert info.annotations == {ENFORCER_ANNOTATION: EnforcerKind.SIDECAR}
    assert info.sidecar_enforced
    assert info.deleting
    assert not info.runnable
    bare = pod_info_from("db-1", "ns", {}, {})
    assert (bare.phase, bare.pod_ip, bare.sidecar_enforced) == (None, None, False)
