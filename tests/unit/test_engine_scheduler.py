"""The loop's timing decisions and stop behaviour, with fake cycles (the real-server case is in tests/pg)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pgwarden.engine.errors import CycleInterrupted, EngineError, TargetUnreachable
from pgwarden.engine.report import CycleReport
from pgwarden.engine.scheduler import DEADLINE_MARGIN, next_start, retry_delay, run_loop
from pgwarden.policy.model import EnforcementAction
from pgwarden.settings import DEFAULTS

MIN_DELAY = DEFAULTS.min_delay


def _report(next_deadline: float | None, observed_at: float, duration: float = 0.0) -> CycleReport:
    return CycleReport(
        "p",
        "t",
        "18.6",
        EnforcementAction.ENFORCE,
        {},
        {},
        next_deadline=next_deadline,
        observed_at=observed_at,
        duration_seconds=duration,
    )


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        (None, 100 + 30),  # nothing to wait for: the interval
        (1000.0, 100 + 30),  # never later than the interval
        (0.001, 100 + 0.001 + DEADLINE_MARGIN),  # a crossing at once: the margin keeps the wake floor
        (0.15, 100.0 + 0.15 + DEADLINE_MARGIN),  # a crossing soon: then, not a second later
        (5.0, 100.2 + 5.0 + DEADLINE_MARGIN),  # measured from when the observation arrived
    ],
)
def test_next_start(deadline: float | None, expected: float) -> None:
    assert next_start(
        _report(deadline, observed_at=100.2 if deadline == 5.0 else 100.0), started=100.0, interval=30
    ) == (pytest.approx(expected))


def test_a_slow_cycle_spaces_the_wake_ups_by_four_times_its_duration() -> None:
    # A server where one look takes 50 ms is looked at every 200 ms at most, however many sessions cross.
    report = _report(0.001, observed_at=100.05, duration=0.05)
    assert next_start(report, started=100.0, interval=30) == pytest.approx(100.2)


def test_retry_delay_backs_off_up_to_the_interval() -> None:
    assert [retry_delay(n, 30) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert retry_delay(1, 0.5) == MIN_DELAY


async def test_loop_follows_deadlines_and_stops_when_asked() -> None:
    started = time.monotonic()
    starts: list[float] = []
    stop = asyncio.Event()

    async def cycle() -> CycleReport:
        starts.append(time.monotonic() - started)
        if len(starts) == 3:
            stop.set()
        return _report(0.2 if len(starts) == 1 else 1.2, observed_at=time.monotonic(), duration=0.1)

    await asyncio.wait_for(
        run_loop(cycle, interval=30, stop=stop, on_report=lambda r: None, on_error=lambda e, n: False), timeout=10
    )
    assert len(starts) == 3
    assert starts[1] == pytest.approx(0.4, abs=0.15)  # 0.2 s asked, a 0.1 s cycle: clamped to 4 times 0.1 s
    assert starts[2] - starts[1] == pytest.approx(1.2 + DEADLINE_MARGIN, abs=0.15)


async def test_stop_during_a_cycle_finishes_that_cycle_and_ends_without_sleeping() -> None:
    stop = asyncio.Event()
    finished: list[CycleReport] = []

    async def cycle() -> CycleReport:
        stop.set()  # a signal arrives mid-cycle
        await asyncio.sleep(0.1)
        return _report(None, observed_at=time.monotonic())

    started = time.monotonic()
    await run_loop(cycle, interval=30, stop=stop, on_report=finished.append, on_error=lambda e, n: False)
    assert len(finished) == 1
    assert time.monotonic() - started < 1


async def test_a_sleeping_loop_wakes_at_once_when_stopped() -> None:
    stop = asyncio.Event()

    async def cycle() -> CycleReport:
        return _report(None, observed_at=time.monotonic())

    task = asyncio.create_task(
        run_loop(cycle, interval=30, stop=stop, on_report=lambda r: None, on_error=lambda e, n: False)
    )
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, timeout=1)


async def test_errors_are_retried_or_raised_as_the_caller_decides() -> None:
    stop = asyncio.Event()
    seen: list[int] = []
    results: list[CycleReport] = []

    async def flaky() -> CycleReport:
        if len(seen) < 2:
            raise TargetUnreachable("down")
        stop.set()
        return _report(None, observed_at=time.monotonic())

    def on_error(exc: EngineError, failures: int) -> bool:
        seen.append(failures)
        return True

    started = time.monotonic()
    await asyncio.wait_for(run_loop(flaky, interval=30, stop=stop, on_report=results.append, on_error=on_error), 10)
    assert seen == [1, 2]
    assert len(results) == 1
    assert time.monotonic() - started == pytest.approx(1 + 2, abs=0.3)  # backoff 1 s, then 2 s

    async def down() -> CycleReport:
        raise TargetUnreachable("down")

    with pytest.raises(TargetUnreachable):
        await run_loop(down, interval=30, stop=asyncio.Event(), on_report=results.append, on_error=lambda e, n: False)


async def test_an_interrupted_cycle_is_reported_before_it_is_handled_as_a_failure() -> None:
    partial = _report(None, observed_at=0.0)
    order: list[str] = []

    async def interrupted() -> CycleReport:
        raise CycleInterrupted("lost while signalling", partial)

    def on_error(exc: EngineError, failures: int) -> bool:
        order.append("error")
        return False

    with pytest.raises(CycleInterrupted):
        await run_loop(
            interrupted,
            interval=30,
            stop=asyncio.Event(),
            on_report=lambda r: order.append("report" if r is partial else "other"),
            on_error=on_error,
        )
    assert order == ["report", "error"]
