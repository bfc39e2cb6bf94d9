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

from pgwarden.enforcement import metrics
from pgwarden.enforcement.kube import StatusConflict, StatusRejected
from pgwarden.enforcement.status import (
    PolicyCondition,
    TargetUpdate,
    compact_status,
    differs,
    is_ready,
    last_write,
    next_status,
)
from pgwarden.settings import DEFAULTS, Settings

log = structlog.get_logger("pgwarden.controller")


class WriteOutcomeUnknown(Exception):
    """The status write was sent but no answer came (timeout, connection lost, 5xx): it may land later, once.

    `write_id` is in the status if it did; `base` is the resourceVersion it was conditioned on (it can land
    only while the policy is still at that version)."""

    def __init__(self, message: str, write_id: str, base: str) -> None:
        super().__init__(message)
        self.write_id = write_id
        self.base = base


class GhostLanded(Exception):
    """A write reported as WriteOutcomeUnknown did land: `write_id` is the one found in the status."""

    def __init__(self, write_id: str) -> None:
        super().__init__(f"status write {write_id} landed after all")
        self.write_id = write_id


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
        carried_totals: Mapping[str, int] | None = None,
        write: tuple[str, str] | None = None,
        ghosts: dict[str, str] | None = None,
    ) -> bool:
        """Apply one step's outcome to the policy's status; True if a write happened.

        `write` is (writer key, write id), recorded in the status. `ghosts` maps ids of earlier writes whose
        outcome is unknown to the resourceVersion each was conditioned on: if the status read here carries
        one, it landed (GhostLanded: the caller drops what it held); those that can no longer land (the
        policy moved past their version without them) are removed from the dict.
        """
        key = (namespace, name)
        obj = dict(latest) if latest is not None else await self.policies.get(namespace, name)
        conflicts = 0
        while True:  # a conflict means another writer made progress: retry until ours lands (or the policy goes)
            if obj is None:
                return False  # the policy is gone; nothing to report on
            meta = obj.get("metadata") or {}
            current = obj.get("status") or {}
            if ghosts and write is not None:
                _settle_ghosts(ghosts, current, write[0], str(meta.get("resourceVersion")))
            new = next_status(
                current,
                writer=writer,
                generation=meta.get("generation"),
                updates=updates,
                owned_pods=owned_pods,
                scope=scope,
                policy_condition=condition,
                carried_totals=carried_totals,
                write=write,
            )
            metrics.record_ready(namespace, name, is_ready(new))
            stale = time.monotonic() - self._last_write.get(key, 0.0) >= self.heartbeat
            if not differs(current, new) and not (stale and updates):
                return False
            base = str(meta.get("resourceVersion"))
            try:
                await self._write(namespace, name, new, base)
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
            except Exception as exc:  # sent, unanswered: it may still land (see WriteOutcomeUnknown)
                if write is None:
                    raise
                raise WriteOutcomeUnknown(f"{type(exc).__name__}: {str(exc)[:300]}", write[1], base) from None
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


def _settle_ghosts(ghosts: dict[str, str], status: Mapping[str, Any], key: str, version: str) -> None:
    """Raise GhostLanded if `status` carries one of `ghosts`; forget those that can no longer land."""
    landed = last_write(status, key)
    if landed is not None and landed in ghosts:
        raise GhostLanded(landed)
    for write_id in [w for w, base in ghosts.items() if base != version]:
        del ghosts[write_id]  # conditioned on an older version, and not in the status: it never will be
