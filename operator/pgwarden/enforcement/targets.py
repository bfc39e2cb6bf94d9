"""Which pods a policy enforces on, from the pods index: pure selection, no API calls."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pgwarden.policy import LabelSelector
from pgwarden.policy.api import ENFORCER_ANNOTATION, EnforcerKind


@dataclass(frozen=True)
class PodInfo:
    """What the index keeps of a pod: just enough to select it and connect to it."""

    name: str
    namespace: str
    phase: str | None
    pod_ip: str | None
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    deleting: bool = False

    @property
    def runnable(self) -> bool:
        """Running, with an address, and not on its way out."""
        return self.phase == "Running" and bool(self.pod_ip) and not self.deleting

    @property
    def sidecar_enforced(self) -> bool:
        return self.annotations.get(ENFORCER_ANNOTATION) == EnforcerKind.SIDECAR


def pod_info_from(name: str, namespace: str, meta: dict[str, object], status: dict[str, object]) -> PodInfo:
    """Reduce a Pod body to PodInfo (the index holds thousands; keep them small)."""
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    return PodInfo(
        name=name,
        namespace=namespace,
        phase=str(status.get("phase")) if status.get("phase") else None,
        pod_ip=str(status.get("podIP")) if status.get("podIP") else None,
        labels=dict(labels) if isinstance(labels, dict) else {},
        annotations={k: v for k, v in annotations.items() if k.startswith("pgwarden.dev/")}
        if isinstance(annotations, dict)
        else {},
        deleting=bool(meta.get("deletionTimestamp")),
    )


def select_targets(selector: LabelSelector | None, pods: Iterable[PodInfo]) -> list[PodInfo]:
    """Pods the policy applies to, sorted by name for stable status and events.

    A policy without a selector targets nothing: the CRD requires one, and "every pod" is never a
    safe reading of a missing field on a tool that kills sessions.
    """
    if selector is None:
        return []
    chosen = {p.name: p for p in pods if p.runnable and selector.matches(p.labels)}
    return [chosen[name] for name in sorted(chosen)]
