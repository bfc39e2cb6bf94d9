"""A policy's status, written in the background so that enforcement never waits for the API server.

The policy loop hands each step's outcome over and goes on: a stalled or restarting API server costs
status freshness, never a database action. Outcomes that arrive while a write is pending are coalesced
into the next write; a failed write is retried with capped exponential backoff and full jitter (many
policies failing together must not hammer a recovering server in lockstep). Only the autovacuum
write-ahead waits, bounded, because PostgreSQL must not be written before status records the write.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from pgwarden.enforcement.background import write_when_woken
from pgwarden.enforcement.status import TOTAL_KEYS, PolicyCondition, TargetUpdate, write_key
from pgwarden.enforcement.status_writer import GhostLanded, StatusWriter, WriteOutcomeUnknown
from pgwarden.settings import DEFAULTS, Settings

log = structlog.get_logger("pgwarden.controller")

FOLD_FACTOR = 4
"""Pending updates allowed per owned target (plus FOLD_SLACK) before superseded ones are folded away."""
FOLD_SLACK = 64


class StatusNotWritten(Exception):
    """A write that had to land (the autovacuum write-ahead) did not, within its bound."""


@dataclass
class _Batch:
    """What the next write applies: every outcome handed over since the last successful write."""

    updates: list[TargetUpdate] = field(default_factory=list)
    owned: list[str] | None = None
    condition: PolicyCondition | None = None
    carried: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTAL_KEYS, 0))

    def add(self, updates: list[TargetUpdate], owned: list[str] | None, condition: PolicyCondition | None) -> None:
        self.updates.extend(updates)
        self.owned = owned  # the latest view of which pods this writer enforces
        self.condition = condition  # the latest step's verdict (None: computed from the targets)

    def fold(self, start: int = 0) -> None:
        """Bound memory through a long API outage: drop updates a later one of the same pod supersedes, adding
        their actions to `carried` so `totals` stay exact. Updates that carry an autovacuum record (written,
        writing, released) are never dropped: status is the only record of what pgwarden wrote. The first
        `start` updates stay as they are (a write that may still land holds them)."""
        latest = {u.pod: i for i, u in enumerate(self.updates)}
        kept = self.updates[:start]
        for i, update in enumerate(self.updates[start:], start):
            if latest[update.pod] == i or _records_a_write(update):
                kept.append(update)
            else:
                for key, value in update.totals().items():
                    self.carried[key] += value
        self.updates = kept

    def without(self, written: _Batch) -> None:
        """What remains after `written` (a snapshot of an earlier state of this batch) has landed."""
        self.updates = self.updates[len(written.updates) :]
        for key in TOTAL_KEYS:
            self.carried[key] -= written.carried[key]

    def snapshot(self) -> _Batch:
        return _Batch(list(self.updates), self.owned, self.condition, dict(self.carried))


def _records_a_write(update: TargetUpdate) -> bool:
    autovacuum = update.report.autovacuum if update.report is not None else None
    return update.writing is not None or update.released or bool(autovacuum is not None and autovacuum.written)


@dataclass
class StatusQueue:
    """One policy's status writes, by one writer (the controller, or one pod's sidecar)."""

    writer: StatusWriter
    namespace: str
    name: str
    kind: str
    latest: Callable[[], Mapping[str, Any] | None]
    """The policy's latest known body (kopf's, or the sidecar's last list); None: read it from the API."""
    scope: Callable[[str], bool] | None = None
    scope_pod: str | None = None
    """A sidecar's own pod: with `kind`, the writer's key in `status.writes`."""
    settings: Settings = DEFAULTS
    _batch: _Batch = field(default_factory=_Batch)
    _submitted: int = 0  # hand-overs so far
    _written: int = 0  # hand-overs included in the last successful write
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _task: asyncio.Task[None] | None = None
    _ghosts: dict[str, str] = field(default_factory=dict)
    """Writes sent but unanswered that may still land: id -> the resourceVersion they were conditioned on."""
    _ghost_batches: dict[str, tuple[_Batch, int]] = field(default_factory=dict)
    failures: int = 0
    """Consecutive failed writes (0 once one lands): the status is that far behind."""

    async def submit(
        self, updates: list[TargetUpdate], owned: list[str], condition: PolicyCondition | None, must_land: bool
    ) -> None:
        """Hand over a step's outcome (the worker's StatusSink). Returns at once unless `must_land`: then it
        waits, within `api_timeout`, until everything handed over so far is written, or raises
        StatusNotWritten."""
        self._batch.add(updates, owned, condition)
        self._submitted += 1
        if must_land:
            try:
                async with asyncio.timeout(self.settings.api_timeout * 2):
                    async with self._lock:
                        await self._write_pending()
            except Exception as exc:
                raise StatusNotWritten(f"status of {self.namespace}/{self.name} not written: {exc}") from None
            return
        self._ensure_running()
        self._wake.set()

    async def close(self, flush_within: float | None = None) -> None:
        """Stop the background writer; with `flush_within` (seconds), first try once more to write what is
        pending."""
        if flush_within is not None and self._dirty:
            try:
                async with asyncio.timeout(flush_within):
                    async with self._lock:
                        await self._write_pending()
            except Exception as exc:  # the policy may be gone, the API server down: the loop ends anyway
                log.info("final status not written", policy=self.name, namespace=self.namespace, error=str(exc))
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def _dirty(self) -> bool:
        return self._submitted != self._written

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"pgwarden status {self.namespace}/{self.name}")

    async def _run(self) -> None:
        await write_when_woken(
            self, self._wake, self._attempt, "status not written; retrying", policy=self.name, namespace=self.namespace
        )

    async def _attempt(self) -> None:
        async with self._lock:
            async with asyncio.timeout(self.settings.api_timeout * 2):
                await self._write_pending()  # resets `failures` when it lands

    async def _write_pending(self) -> None:
        """Write everything handed over so far (callers hold the lock: one write at a time, so the batch is
        folded and trimmed only here).

        A write whose answer was lost (timeout, connection reset) may still land later, once. So it is
        remembered; the next attempt reads the status afresh, and if that write's id is there, drops what it
        carried instead of applying it twice (status totals stay exactly the server's count of actions).
        """
        while self._dirty:
            held = max((len(batch.updates) for batch, _ in self._ghost_batches.values()), default=0)
            if len(self._batch.updates) - held > FOLD_FACTOR * len(self._batch.owned or ()) + FOLD_SLACK:
                self._batch.fold(held)
            submitted = self._submitted
            written = self._batch.snapshot()
            write_id = uuid.uuid4().hex[:16]
            try:
                await self.writer.record(
                    self.namespace,
                    self.name,
                    latest=None if self._ghosts else self.latest(),  # a ghost may be newer than any cached body
                    writer=self.kind,
                    updates=written.updates,
                    owned_pods=written.owned,
                    scope=self.scope,
                    condition=written.condition,
                    carried_totals=written.carried,
                    write=(write_key(self.kind, self.scope_pod), write_id),
                    ghosts=self._ghosts,
                )
            except GhostLanded as landed:
                batch, count = self._ghost_batches[landed.write_id]
                log.info("a status write thought lost had landed", policy=self.name, namespace=self.namespace)
                self._batch.without(batch)
                self._written = count
                self._forget_ghosts()
                continue  # what came after it is written now
            except WriteOutcomeUnknown as exc:
                self._ghosts[exc.write_id] = exc.base
                self._ghost_batches[exc.write_id] = (written, submitted)
                raise
            finally:
                for gone in [g for g in self._ghost_batches if g not in self._ghosts]:
                    del self._ghost_batches[gone]
            self._batch.without(written)
            self._written = submitted
            self._forget_ghosts()  # ours landed on a newer version: none of them can any more
            self.failures = 0
            return

    def _forget_ghosts(self) -> None:
        self._ghosts.clear()
        self._ghost_batches.clear()
