"""The status writer against a fake API that keeps a resourceVersion: conflicts retried, heartbeats spared."""

from __future__ import annotations

import asyncio
import copy
import random
from typing import Any

from pgwarden.enforcement import metrics
from pgwarden.enforcement.kube import StatusConflict, StatusRejected
from pgwarden.enforcement.status import TargetUpdate, status_size
from pgwarden.enforcement.status_writer import StatusWriter
from pgwarden.policy.api import EnforcerKind
from tests.harness.reports import action, cycle_report


class FakePolicies:
    """One stored policy; `write_status` honours the resourceVersion precondition as the API server does."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = {"metadata": {"generation": 1, "resourceVersion": "1"}, "status": {}}
        self.writes: list[dict[str, Any]] = []
        self.reads = 0
        self.sneak_in: list[dict[str, Any]] = []
        """Status entries another writer (a sidecar) writes just before each of our next writes."""

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return copy.deepcopy(self.obj)

    async def write_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> str:
        assert self.obj is not None
        if self.sneak_in:
            self._store(dict(self.obj["status"], targets=[self.sneak_in.pop(0)]))
        if resource_version != self.obj["metadata"]["resourceVersion"]:
            raise StatusConflict(f"{namespace}/{name} changed")
        self.writes.append(copy.deepcopy(status))
        return self._store(status)

    def _store(self, status: dict[str, Any]) -> str:
        assert self.obj is not None
        version = str(int(self.obj["metadata"]["resourceVersion"]) + 1)
        self.obj = {"metadata": {"generation": 1, "resourceVersion": version}, "status": copy.deepcopy(status)}
        return version


def _update(*pids: int) -> TargetUpdate:
    return TargetUpdate("db-0", "127.0.0.2", EnforcerKind.CONTROLLER, cycle_report(*(action(p) for p in pids)))


async def _record(writer: StatusWriter, update: TargetUpdate | None = None) -> bool:
    return await writer.record(
        "ns", "p", latest=None, writer=EnforcerKind.CONTROLLER, updates=[update] if update else [], owned_pods=["db-0"]
    )


async def test_a_conflict_is_retried_on_a_fresh_read_and_keeps_the_other_writers_entry() -> None:
    policies = FakePolicies()
    policies.sneak_in.append({"pod": "db-9", "enforcer": EnforcerKind.SIDECAR, "lastCycleTime": "2026-01-01T00:00:00Z"})
    writer = StatusWriter(policies)
    assert await _record(writer, _update(7))
    (written,) = policies.writes
    assert [t["pod"] for t in written["targets"]] == ["db-0", "db-9"]
    assert written["totals"]["terminated"] == 1  # counted once, not once per attempt
    assert policies.reads == 2
    assert writer.writes == 1


async def test_a_heartbeat_only_change_is_not_written_until_the_heartbeat_is_due() -> None:
    policies = FakePolicies()
    writer = StatusWriter(policies, heartbeat=3600.0)
    assert await _record(writer, _update())
    assert not await _record(writer, _update())  # only lastCycleTime moved
    assert await _record(writer, _update(8))  # something new: written at once
    assert len(policies.writes) == 2
    writer.heartbeat = 0.0
    assert await _record(writer, _update())  # stale: the heartbeat refreshes lastCycleTime and the counts
    assert not await _record(writer)  # ...but only when a target was evaluated
    assert len(policies.writes) == 3


async def test_a_writer_that_keeps_losing_never_gives_up_and_a_gone_policy_is_not_written() -> None:
    policies = FakePolicies()
    conflicts = 5  # more than max_attempts: the writer backs off, and still writes its totals
    policies.sneak_in.extend({"pod": f"db-{9 + i}", "enforcer": EnforcerKind.SIDECAR} for i in range(conflicts))
    writer = StatusWriter(policies, max_attempts=2)
    assert await _record(writer, _update(7))
    (written,) = policies.writes
    assert written["totals"]["terminated"] == 1
    assert policies.reads == 1 + conflicts  # the first read, and one after each conflict
    policies.obj = None
    assert not await _record(StatusWriter(policies), _update(7))


class RacyPolicies(FakePolicies):
    """Every call yields to the other writers, and a write also conflicts at random (another writer's
    write that the test does not model), as a busy API server does."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.random = random.Random(seed)  # noqa: S311 - a reproducible test schedule
        self.conflicts = 0

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        return await super().get(namespace, name)

    async def write_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> str:
        await asyncio.sleep(0)
        if self.random.random() < 0.3:
            self.conflicts += 1
            raise StatusConflict(f"{namespace}/{name} changed")
        try:
            return await super().write_status(namespace, name, status, resource_version)
        except StatusConflict:
            self.conflicts += 1
            raise


async def test_twenty_concurrent_writers_lose_no_totals() -> None:
    """20 writers (sidecars) each report 5 acting cycles on their own pod at once: every action counted once."""
    policies = RacyPolicies(seed=11)

    async def sidecar(index: int) -> None:
        writer = StatusWriter(policies, max_attempts=2)
        pod = f"db-{index}"

        def own(name: str) -> bool:
            return name == pod

        for cycle in range(5):
            update = TargetUpdate(pod, None, EnforcerKind.SIDECAR, cycle_report(*(action(p) for p in range(index + 1))))
            assert await writer.record(
                "ns",
                "p",
                latest=None,
                writer=EnforcerKind.SIDECAR,
                updates=[update],
                owned_pods=[pod],
                scope=own,
            ), f"{pod} cycle {cycle}"

    await asyncio.gather(*(sidecar(i) for i in range(20)))
    assert policies.obj is not None
    status = policies.obj["status"]
    assert status["totals"]["terminated"] == 5 * sum(range(1, 21))
    assert len(status["targets"]) == 20
    assert policies.conflicts > 100  # the writers really collided


class RefusingPolicies(FakePolicies):
    """An API server that refuses (413/422) any status whose JSON is over `limit` bytes, like etcd's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.refused = 0

    async def write_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> str:
        if status_size(status) > self.limit:
            self.refused += 1
            raise StatusRejected(f"{namespace}/{name}: status refused with HTTP 413: Request Entity Too Large")
        return await super().write_status(namespace, name, status, resource_version)


async def test_a_status_the_api_server_refuses_falls_back_to_its_compact_form() -> None:
    policies = RefusingPolicies(limit=2000)
    writer = StatusWriter(policies)
    assert await _record(writer, _update(*range(1, 21)))
    assert policies.refused == 1
    (written,) = policies.writes
    (entry,) = written["targets"]
    assert "lastActions" not in entry
    assert written["totals"]["terminated"] == 20  # the totals survive the fallback


async def test_a_status_refused_even_compact_is_logged_and_never_raised() -> None:
    policies = RefusingPolicies(limit=10)
    writer = StatusWriter(policies)
    assert not await _record(writer, _update(7))
    assert policies.refused == 2  # the status, then its compact form
    assert policies.writes == []
    assert await _record(StatusWriter(FakePolicies()), _update(8))  # an ordinary API server is written to


async def test_the_ready_gauge_follows_the_status_ready_condition() -> None:
    """pgwarden_policy_ready (alert PgwardenPolicyNotReady) is the Ready condition the status carries."""
    policies = FakePolicies()
    writer = StatusWriter(policies)
    labels = {"namespace": "ns", "policy": "p"}
    failing = TargetUpdate("db-0", "127.0.0.2", EnforcerKind.CONTROLLER, error="connection refused")
    assert await _record(writer, failing)
    assert metrics.REGISTRY.get_sample_value("pgwarden_policy_ready", labels) == 0
    assert await _record(writer, _update())
    assert metrics.REGISTRY.get_sample_value("pgwarden_policy_ready", labels) == 1
