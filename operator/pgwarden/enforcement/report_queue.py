"""A policy's openreports Report, kept in the background so that enforcement never waits for it.

The policy loop's status sink hands each step's outcome here too (`submit` only folds it into memory and
wakes the writer). The writer builds the Report and writes it only when it says something new: the first
time it reads what an earlier process wrote, so a restart does not rewrite an unchanged Report either.
A failed write is retried with capped, jittered backoff, like the status; every request is bounded by
`api_timeout`. Reports are a view for dashboards: never a reason to delay or fail an action.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from pgwarden.enforcement.background import write_when_woken
from pgwarden.enforcement.reports import ReportState, differs, ours, report_body, rule_names
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate
from pgwarden.policy import PolicyError, parse_spec
from pgwarden.policy.api import REPORT_OMITTED_ANNOTATION
from pgwarden.settings import DEFAULTS, Settings

log = structlog.get_logger("pgwarden.controller")


class ReportStore(Protocol):
    """The calls the queue makes (`pgwarden.enforcement.kube.ReportApi`)."""

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Report, or None when there is none."""

    async def put(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create or update the Report; returns it as stored."""

    async def delete(self, namespace: str, name: str, uid: str) -> bool:
        """Delete the Report if it is still the object `uid`; False if there was none."""


@dataclass
class ReportQueue:
    """One policy's Report, written by the controller replica that enforces it."""

    store: ReportStore
    namespace: str
    name: str
    latest: Callable[[], Mapping[str, Any]]
    """The policy's latest body (kopf's): its uid for the owner reference, its spec for the rule names."""
    settings: Settings = DEFAULTS
    state: ReportState = field(default_factory=ReportState)
    writes: int = 0
    failures: int = 0
    _written: Mapping[str, Any] | None = None  # what the Report holds, as last written or read
    _read: bool = False  # whether an earlier process's Report has been read
    foreign: bool = False
    """A Report of that name exists and is not pgwarden's: it is left alone (neither written nor deleted)."""
    _rules: tuple[int | None, list[str]] | None = None  # (generation, its rule names)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def submit(
        self, updates: list[TargetUpdate], owned: list[str], condition: PolicyCondition | None, must_land: bool
    ) -> None:
        """Fold a step's outcome in and wake the writer; never waits for the API server. (The autovacuum
        write-ahead, `must_land`, carries no verdict of any rule: it is not a step.)"""
        if must_land:
            return
        try:
            self.state.apply(updates, owned, condition)
        except Exception as exc:  # a view for dashboards: whatever goes wrong here, the status and the loop go on
            log.warning("policy report not updated", policy=self.name, namespace=self.namespace, error=repr(exc)[:300])
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"pgwarden report {self.namespace}/{self.name}")
        self._wake.set()

    async def close(self) -> None:
        """Stop the writer (a Report a step later than the last one written is rebuilt by the next process)."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def delete(self) -> None:
        """Remove the Report (the policy is gone), if it is pgwarden's; bounded, and never raises: garbage
        collection of the owner reference removes it anyway where a controller manager runs."""
        await self.close()
        try:
            async with asyncio.timeout(self.settings.api_timeout * 2):
                existing = self._written if self._read else await self.store.get(self.namespace, self.name)
                uid = (existing or {}).get("metadata", {}).get("uid")
                if existing is None or not ours(existing) or not uid:
                    return
                deleted = await self.store.delete(self.namespace, self.name, str(uid))
            log.info("policy report deleted", policy=self.name, namespace=self.namespace, existed=deleted)
        except Exception as exc:
            log.warning("policy report not deleted", policy=self.name, namespace=self.namespace, error=str(exc)[:300])

    async def _run(self) -> None:
        await write_when_woken(
            self,
            self._wake,
            self._attempt,
            "policy report not written; retrying",
            policy=self.name,
            namespace=self.namespace,
        )

    async def _attempt(self) -> None:
        async with asyncio.timeout(self.settings.api_timeout * 2):
            await self._write_if_changed()
        self.failures = 0

    async def _write_if_changed(self) -> None:
        if not self._read:
            self._written = await self.store.get(self.namespace, self.name)
            self._read = True
            if self._written is not None and not ours(self._written):
                self.foreign = True
                log.warning(
                    "a Report of the policy's name is not pgwarden's; no policy report written",
                    policy=self.name,
                    namespace=self.namespace,
                )
        if self.foreign:
            return
        policy = self.latest()
        wanted = report_body(self.namespace, policy, self._rule_names(policy), self.state, self._written)
        if not differs(self._written, wanted):
            return
        self._written = await self.store.put(self.namespace, wanted)
        self.writes += 1
        omitted = (wanted["metadata"].get("annotations") or {}).get(REPORT_OMITTED_ANNOTATION)
        log.info(
            "policy report written", policy=self.name, namespace=self.namespace, omitted=omitted, **wanted["summary"]
        )

    def _rule_names(self, policy: Mapping[str, Any]) -> list[str]:
        """The spec's rule names, parsed again only when the generation moves (an invalid spec has none)."""
        generation = (policy.get("metadata") or {}).get("generation")
        if self._rules is None or self._rules[0] != generation or generation is None:
            try:
                names = rule_names(parse_spec(dict(policy.get("spec") or {})))
            except PolicyError:
                names = []
            self._rules = (generation, names)
        return self._rules[1]
