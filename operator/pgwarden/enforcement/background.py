"""The background writer loop a policy's status and its Report share: write when woken, retry when refused.

Both are written in the background so that enforcement never waits for the API server. Each owner wakes
its loop when there is something new; a failed attempt is retried after the settings' capped, jittered
backoff (`Settings.api_retry_delay`), so many policies failing together do not hammer a recovering server
in lockstep. The loop never ends but by cancellation: an exception only postpones the next attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from pgwarden.settings import Settings

log = structlog.get_logger("pgwarden.controller")


class Retrying(Protocol):
    """The owner of a loop: its count of consecutive failures (the owner resets it when a write lands)."""

    failures: int
    settings: Settings


async def write_when_woken(
    owner: Retrying,
    wake: asyncio.Event,
    attempt: Callable[[], Awaitable[None]],
    message: str,
    **context: str,
) -> None:
    """Run `attempt` each time `wake` is set; after a failure, log `message` and try again after a backoff."""
    while True:
        await wake.wait()
        wake.clear()
        try:
            await attempt()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never ends the writer: the next attempt comes after a backoff
            owner.failures += 1
            delay = owner.settings.api_retry_delay(owner.failures)
            log.warning(
                message,
                **context,
                attempt=owner.failures,
                retry_in=round(delay, 2),
                error=str(exc)[:300] or type(exc).__name__,
            )
            await asyncio.sleep(delay)
            wake.set()
