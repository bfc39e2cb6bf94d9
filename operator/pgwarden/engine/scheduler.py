"""Deadline-aware evaluation loop for one target: evaluate again when the next seen session crosses a rule.

With `interval: 30s` and `stateAge: 10m`, a fixed timer would terminate a session up to 30 s late. The
observation tells when the next currently-seen session crosses a threshold, so the loop wakes then (plus
a few milliseconds, which also groups crossings that close together into one wake-up), clamped so that
cycles start at most the observation gap apart (see `PolicySpec.observation_gap`: no session crosses
unseen) and at least `Settings.crossing_floor` apart (so a burst of crossings cannot turn into a busy loop).

Stopping is cooperative: setting the event wakes a sleeping loop at once; a cycle in progress is always
finished first, so signals are never cut off half way through a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from pgwarden.engine.errors import CycleInterrupted, EngineError
from pgwarden.engine.report import CycleReport
from pgwarden.settings import DEFAULTS, Settings

DEADLINE_MARGIN = 0.02
"""Added to a deadline to absorb clock-rate differences (the reference point is already never early); it
also groups the crossings that fall within it into one wake-up."""

log = structlog.get_logger("pgwarden.engine")


def next_start(report: CycleReport, *, started: float, interval: float, settings: Settings = DEFAULTS) -> float:
    """Monotonic time at which the next cycle should start, given this cycle's report."""
    latest = started + interval
    if report.next_deadline is None:
        return latest
    crossing = report.observed_at + report.next_deadline + DEADLINE_MARGIN
    return max(started + settings.crossing_floor(report.duration_seconds), min(latest, crossing))


def retry_delay(failures: int, interval: float, settings: Settings = DEFAULTS) -> float:
    """Back off after consecutive failures: 1 s, 2 s, 4 s ... never longer than `interval` (`Settings.retry_delay`,
    the rule the controller and the sidecar follow too)."""
    return settings.retry_delay(failures, interval)


async def _sleep_until(deadline: float, stop: asyncio.Event, clock: Callable[[], float]) -> None:
    delay = deadline - clock()
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


async def run_loop(
    cycle: Callable[[], Awaitable[CycleReport]],
    *,
    interval: float,
    stop: asyncio.Event,
    on_report: Callable[[CycleReport], None],
    on_error: Callable[[EngineError, int], bool],
    clock: Callable[[], float] = time.monotonic,
    settings: Settings = DEFAULTS,
) -> None:
    """Run `cycle` until `stop` is set.

    `on_error(exc, consecutive_failures)` decides whether an engine failure ends the loop (False: the
    exception is re-raised) or is retried with backoff (True).
    """
    failures = 0
    while not stop.is_set():
        started = clock()
        try:
            report = await cycle()
        except EngineError as exc:
            if isinstance(exc, CycleInterrupted):
                on_report(exc.report)  # what was done before the failure is reported all the same
            failures += 1
            if not on_error(exc, failures):
                raise
            await _sleep_until(started + retry_delay(failures, interval, settings), stop, clock)
            continue
        failures = 0
        on_report(report)
        wake = next_start(report, started=started, interval=interval, settings=settings)
        log.debug("next cycle", in_seconds=round(wake - clock(), 3), next_deadline=report.next_deadline)
        await _sleep_until(wake, stop, clock)
