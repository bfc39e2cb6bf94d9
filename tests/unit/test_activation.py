"""The activation gate: a peered replica's policy loop acts only `settle` after the later of its own peering
record showing and the loop's start, and never when it is stopped first (tests/e2e/test_ha_start.py proves
the effect on a real API server and PostgreSQL)."""

from __future__ import annotations

import asyncio

from pgwarden.enforcement.activation import ActivationGate
from pgwarden.enforcement.pool import controller_application_name


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_at_is_settle_after_the_later_of_record_and_start() -> None:
    clock = Clock()
    gate = ActivationGate(settle=5.0, clock=clock)
    assert gate.ready_at(100.0) is None  # own record not seen yet: never ready
    clock.now = 102.0
    gate.record_seen()
    assert gate.ready_at(90.0) == 107.0  # a loop started before the record showed
    assert gate.ready_at(110.0) == 115.0  # a loop started later (a resume, a new policy)
    clock.now = 150.0
    gate.record_seen()  # the first sighting counts
    assert gate.ready_at(90.0) == 107.0


def test_wait_opens_after_settle_and_a_stop_wins() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        gate = ActivationGate(settle=0.05)
        never = asyncio.Event()
        stop = asyncio.Event()
        stopped_first = asyncio.ensure_future(gate.wait(gate.clock(), stop.wait()))
        await asyncio.sleep(0.01)
        stop.set()  # the replica paused while its loop waited for its own record
        first = await stopped_first
        gate.record_seen()
        started = gate.clock()
        opened = await gate.wait(started, never.wait())
        waited = gate.clock() - started >= 0.05
        return first, opened, waited

    first, opened, waited = asyncio.run(scenario())
    assert first is False
    assert opened is True
    assert waited


def test_controller_connections_are_named_after_the_replica() -> None:
    assert controller_application_name("pgwarden-5c7d-x2x4q") == "pgwarden/pgwarden-5c7d-x2x4q"
    long = controller_application_name("uid-10001@" + "h" * 80 + "/20261201/ab")
    assert long.startswith("pgwarden/")
    assert len(long.encode()) == 63  # what PostgreSQL keeps
