"""Writes a policy's status safely when several writers share it, and only when it says something new.

Read-modify-write with a resourceVersion precondition: a conflict means another writer got there
first, so we read again and recompute. A write that would change only timestamps is skipped unless a
minute has passed, so a quiet cluster sees no write storm (and kopf never sees a status loop: its
handlers ignore status, and this writer never touches the spec).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from pgwarden.enforcement.kube import StatusConflict, StatusRejected
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate, compact_status, differs, next_status
from pgwarden.settings import DEFAULTS, Settings

log = structlog.get_logger("pgwarden.controller")


class PolicyStore(Protocol):
    """The two calls the writer makes (`pgwarden.enforcement.kube.PolicyApi`)."""

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The policy, or None when it is gone."""

    async def write_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> str:
        """Write `status` if the policy is still at `resource_version` (else StatusConflict)."""


@dataclass
class StatusWriter:
    policies: PolicyStore
    heartbeat: float = DEFAULTS.status_heartbeat
    max_attempts: int = DEFAULTS.status_write_attempts
    writes: int = 0
    _last_write: dict[tuple[str, str], float] = field(default_factory=dict)

    async def record(
        self,
        namespace: str,
        name: str,
        *,
        latest: Mapping[str, Any] | None,
        writer: str,
        updates: list[TargetUpdate],
        owned_pods: list[str] | None,
        scope: Callable[[str], bool] | None = None,
        condition: PolicyCondition | None = None,
    ) -> bool:
        """Apply one step's outcome to the policy's status; True if a write happened."""
        key = (namespace, name)
        obj = dict(latest) if latest is not None else await self.policies.get(namespace, name)
        conflicts = 0
        while True:  # a conflict means another writer made progress: retry until ours lands (or the policy goes)
            if obj is None:
                return False  # the policy is gone; nothing to report on
            meta = obj.get("metadata") or {}
            current = obj.get("status") or {}
            new = next_status(
                current,
                writer=writer,
                generation=meta.get("generation"),
                updates=updates,
                owned_pods=owned_pods,
                scope=scope,
                policy_condition=condition,
            )
            stale = time.monotonic() - self._last_write.get(key, 0.0) >= self.heartbeat
            if not differs(current, new) and not (stale and updates):
                return False
            try:
                await self._write(namespace, name, new, str(meta.get("resourceVersion")))
            except StatusConflict:
                conflicts += 1
                await self._pause(conflicts)
                obj = await self.policies.get(namespace, name)
                continue
            except StatusRejected as exc:
                # Never a crash of the loop (issue: a status past etcd's limit crashed the daemon on every write):
                # this step's report is lost from status, not from metrics, Events or the log.
                log.warning(
                    "status refused by the API server; not written", policy=name, namespace=namespace, error=str(exc)
                )
                return False
            self._last_write[key] = time.monotonic()
            self.writes += 1
            return True

    async def _pause(self, conflicts: int) -> None:
        """Nothing for the first `max_attempts` conflicts; then full jitter up to 1 s, so 20 writers that keep
        colliding spread out. (Giving up instead lost the step's totals: issue 12 item 8.)"""
        if conflicts >= self.max_attempts:
            await asyncio.sleep(random.uniform(0.0, min(1.0, 0.01 * 2 ** min(conflicts - self.max_attempts, 10))))  # noqa: S311 - jitter

    async def _write(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> None:
        """Write `status`; if the API server refuses it (too large, invalid), write its compact form instead."""
        try:
            await self.policies.write_status(namespace, name, status, resource_version)
        except StatusRejected as exc:
            log.warning(
                "status refused; writing it without lastActions", policy=name, namespace=namespace, error=str(exc)
            )
            await self.policies.write_status(namespace, name, compact_status(status), resource_version)

    @classmethod
    def configured(cls, policies: PolicyStore, settings: Settings) -> StatusWriter:
        return cls(policies, heartbeat=settings.status_heartbeat, max_attempts=settings.status_write_attempts)

    def forget(self, namespace: str, name: str) -> None:
        self._last_write.pop((namespace, name), None)
