"""Status written in the background: enforcement hands a step over and goes on, whatever the API server does.

The fake API can stall (every call hangs until released) or fail; the worker's side (`submit`) must return
at once meanwhile, and once the API answers again the status must hold exactly the actions taken during the
outage, coalesced into few writes.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import Any

import pytest

from pgwarden.enforcement.status import TargetUpdate
from pgwarden.enforcement.status_queue import FOLD_SLACK, StatusNotWritten, StatusQueue
from pgwarden.enforcement.status_writer import StatusWriter
from pgwarden.policy.api import EnforcerKind
from pgwarden.settings import DEFAULTS
from tests.harness.postgres import wait_for_async
from tests.unit.test_enforcement_status_writer import FakePolicies

FAST = dataclasses.replace(DEFAULTS, min_delay=0.02, status_retry_max=0.05, api_timeout=0.2)


class StallingPolicies(FakePolicies):
    """FakePolicies whose calls hang while `stalled` is set, or raise `failure` (a 503, a reset)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.open.set()
        self.failure: Exception | None = None
        self.attempts = 0
        self.ghosts: list[bool] = []
        """Outcomes of the next writes that time out: True = applied anyway (a ghost), False = never applied."""

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.attempts += 1
        await self.open.wait()
        if self.failure is not None:
            raise self.failure
        return await super().get(namespace, name)

    async def write_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> str:
        await self.open.wait()
        if self.failure is not None:
            raise self.failure
        if self.ghosts:
            if self.ghosts.pop(0):
                await super().write_status(namespace, name, status, resource_version)
            raise TimeoutError("read timed out")  # the answer is lost, whatever happened
        return await super().write_status(namespace, name, status, resource_version)


def _update(pod: str, *pids: int) -> TargetUpdate:
    from tests.harness.reports import action, cycle_report

    return TargetUpdate(pod, "127.0.0.2", EnforcerKind.CONTROLLER, cycle_report(*(action(p) for p in pids)))


def _queue(policies: FakePolicies) -> StatusQueue:
    return StatusQueue(StatusWriter(policies), "ns", "p", EnforcerKind.CONTROLLER, latest=lambda: None, settings=FAST)


def _terminated(policies: FakePolicies) -> int:
    assert policies.obj is not None
    return int((policies.obj["status"].get("totals") or {}).get("terminated", 0))


async def test_a_stalled_api_server_never_blocks_a_step_and_nothing_is_lost_when_it_answers_again() -> None:
    policies = StallingPolicies()
    queue = _queue(policies)
    policies.open.clear()  # the API server stops answering
    loop = asyncio.get_running_loop()
    started = loop.time()
    for step in range(200):  # 200 steps on 2 targets, each terminating one session
        await queue.submit([_update(f"db-{step % 2}", 1000 + step)], ["db-0", "db-1"], None, False)
    assert loop.time() - started < 0.5  # handed over, never waited for
    await wait_for_async(lambda: policies.attempts >= 3, within=10, message="write attempts during the stall")
    assert policies.writes == []
    policies.open.set()
    await wait_for_async(lambda: _terminated(policies) == 200, within=10, message="every action in totals")
    assert len(policies.writes) <= 3  # coalesced: not one write per step
    assert {t["pod"] for t in policies.obj["status"]["targets"]} == {"db-0", "db-1"}  # type: ignore[index]
    await queue.close()


async def test_failed_writes_are_retried_with_backoff_until_one_lands() -> None:
    policies = StallingPolicies()
    policies.failure = RuntimeError("503 Service Unavailable")
    queue = _queue(policies)
    await queue.submit([_update("db-0", 7)], ["db-0"], None, False)
    await wait_for_async(lambda: queue.failures >= 3, within=10, message="retries")
    policies.failure = None
    await wait_for_async(lambda: _terminated(policies) == 1, within=10, message="the write after the outage")
    assert queue.failures == 0
    await queue.close()


async def test_a_long_outage_folds_superseded_updates_and_keeps_totals_exact() -> None:
    policies = StallingPolicies()
    policies.failure = RuntimeError("connection refused")
    queue = _queue(policies)
    steps = 20 * (FOLD_SLACK + 10)
    for step in range(steps):
        await queue.submit([_update("db-0", step)], ["db-0"], None, False)
        if step % 50 == 0:
            await asyncio.sleep(0)  # let the writer attempt (and fold) now and then
    await wait_for_async(lambda: policies.attempts >= 2, within=10, message="attempts")
    policies.failure = None
    await wait_for_async(lambda: _terminated(policies) == steps, within=10, message="exact totals")
    assert len(queue._batch.updates) == 0
    await queue.close()


async def test_a_write_that_must_land_waits_and_fails_within_its_bound_when_the_api_stalls() -> None:
    """The autovacuum write-ahead: PostgreSQL is written only after status records the write."""
    policies = StallingPolicies()
    queue = _queue(policies)
    await queue.submit([_update("db-0", 5)], ["db-0"], None, True)
    assert _terminated(policies) == 1  # landed before submit returned
    policies.open.clear()
    with pytest.raises(StatusNotWritten):
        await queue.submit([_update("db-0", 6)], ["db-0"], None, True)
    policies.open.set()
    await queue.close(flush_within=1.0)
    assert _terminated(policies) == 2  # what was handed over with the refused write still reaches status


async def test_close_flushes_what_is_pending() -> None:
    policies = StallingPolicies()
    queue = _queue(policies)
    policies.open.clear()
    await queue.submit([_update("db-0", 1, 2)], ["db-0"], None, False)
    policies.open.set()
    await queue.close(flush_within=1.0)
    assert _terminated(policies) == 2
    snapshot = copy.deepcopy(policies.writes)
    await queue.close(flush_within=1.0)  # nothing pending: nothing written
    assert policies.writes == snapshot


@pytest.mark.parametrize("landed", [True, False])
async def test_a_write_whose_answer_was_lost_is_applied_exactly_once(landed: bool) -> None:
    """The request reached the API server but the answer did not reach us: it may have landed. The next
    attempt recognises its id in the status and does not add its actions a second time."""
    policies = StallingPolicies()
    queue = _queue(policies)
    policies.ghosts = [landed]
    await queue.submit([_update("db-0", 1, 2)], ["db-0"], None, False)
    await wait_for_async(lambda: policies.attempts >= 1 and not policies.ghosts, message="the lost answers")
    await queue.submit([_update("db-0", 3)], ["db-0"], None, False)
    await wait_for_async(lambda: queue.failures == 0 and not queue._dirty, message="the status written")
    assert _terminated(policies) == 3
    assert policies.obj is not None
    assert set(policies.obj["status"]["writes"]) == {"controller"}
    await queue.close()
