"""The event loop's handler for exceptions nobody awaited: one known kopf defect is not an error of ours.

kopf 1.45's watch streams register a done-callback on their stopper that calls `asyncio.current_task()`
and asserts it is not None; done-callbacks run outside any task, so when a replica pauses for a peer (or
stops) while a watch request waits for its headers, asyncio logs "Exception in callback
stream.<locals>.request_cancel_callback" with an AssertionError at error level. Nothing is lost: kopf's
stream loop sees the stopper and ends the watch anyway. An operator that logs errors when all is well
trains its users to ignore errors, so that one callback's failure is logged at debug level, with this
explanation; every other unhandled exception still reaches asyncio's default handler.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

log = structlog.get_logger("pgwarden.controller")

KOPF_STREAM_CALLBACK = "stream.<locals>.request_cancel_callback"


def is_kopf_stream_cancel_defect(context: dict[str, Any]) -> bool:
    """True for exactly the known kopf failure: that callback, raising AssertionError."""
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    return isinstance(context.get("exception"), AssertionError) and (
        getattr(callback, "__qualname__", "") == KOPF_STREAM_CALLBACK
    )


def handle_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if is_kopf_stream_cancel_defect(context):
        log.debug("kopf's watch-stream cancel callback failed outside a task; harmless, the watch ends anyway")
        return
    loop.default_exception_handler(context)


def install(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_exception_handler(handle_loop_exception)
