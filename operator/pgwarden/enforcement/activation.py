"""When a peered replica may start acting: only once its peers can have seen it and paused.

kopf's peering pauses a replica that sees a live peer with a higher priority, but nothing makes a replica
wait for its peers to see *it*. Two replicas started together each read the peering object before the
other's record is in it, both resume and both enforce until the next peering event arrives; a replica
that resumes because the active one left (or a newcomer with a higher priority) acts at once, while the
replica it replaces may still be finishing an evaluation.

The gate closes those windows with one rule: in a peered replica, a policy's loop takes its first action
only `settle` seconds after the later of
  (a) the moment the replica saw its own record in the peering object: any peer that reads the object
      from then on sees it, and a peer that wrote before is already in that same read, and
  (b) the moment the loop started: kopf starts loops when the replica resumes, and stops them when it pauses.
Within `settle`, the lower-priority peer of two started together sees the other and pauses (its loops are
stopped while they wait here, so it never acts at all), and a replica that is being replaced stops its loops
and cancels the evaluations in flight. So `settle` must exceed the time a peer needs to see a change of the
peering object (the watch's latency, milliseconds on a healthy API server) plus the time a stopping loop
needs to cancel its evaluation (bounded by the engine's statement timeout, in practice milliseconds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from kubernetes import client

from pgwarden.enforcement.kube import peering_record_present

log = structlog.get_logger("pgwarden.activation")

RECORD_POLL_SECONDS = 0.25
"""How often the peering object is read until the replica's own record shows (a few reads at start-up)."""


class ActivationGate:
    """Holds a peered replica's policy loops until their first action is safe (see the module docstring)."""

    def __init__(self, settle: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle = settle
        self.clock = clock
        self._seen_at: float | None = None
        self._seen = asyncio.Event()

    def record_seen(self) -> None:
        """The replica's own record is in the peering object (every watched one); the first call counts."""
        if self._seen_at is None:
            self._seen_at = self.clock()
            self._seen.set()

    def ready_at(self, started_at: float) -> float | None:
        """The clock reading from which a loop started at `started_at` may act; None until the record shows."""
        if self._seen_at is None:
            return None
        return max(self._seen_at, started_at) + self.settle

    async def wait(self, started_at: float, stop: Awaitable[Any]) -> bool:
        """Wait until the loop started at `started_at` may act (True), or until `stop` completes first (False)."""
        ready = asyncio.ensure_future(self._ready(started_at))
        stopping = asyncio.ensure_future(stop)
        try:
            done, _ = await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (ready, stopping):
                waiter.cancel()
            await asyncio.gather(ready, stopping, return_exceptions=True)
        return stopping not in done  # a stop that lands together with readiness wins: acting is never the default

    async def _ready(self, started_at: float) -> None:
        await self._seen.wait()
        at = self.ready_at(started_at)
        assert at is not None
        delay = at - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)


async def watch_own_record(
    api: client.ApiClient, name: str, namespaces: Sequence[str] | None, identity: str, gate: ActivationGate
) -> None:
    """Read the peering object(s) until this replica's record is in each, then open the gate's clock.

    kopf writes the record from its keep-alive task, which starts with its watch of the same object; reading
    it here (list by name: the verb kopf's watch needs anyway) is the one way to know the write landed.
    """
    where: list[str | None] = [None] if namespaces is None else list(namespaces)
    pending = set(where)
    while pending:
        for namespace in list(pending):
            try:
                present = await asyncio.to_thread(peering_record_present, api, name, namespace, identity)
            except Exception as exc:  # a failed read is retried; the gate stays shut meanwhile
                log.warning("peering object not readable", name=name, namespace=namespace, error=str(exc))
                present = False
            if present:
                pending.discard(namespace)
        if pending:
            await asyncio.sleep(RECORD_POLL_SECONDS)
    log.info("own peering record visible", name=name, identity=identity)
    gate.record_seen()
