"""The loop's exception handler hides exactly kopf's stream-cancel defect and nothing else."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pgwarden.controller import loop_errors


def stream() -> object:
    """Stands in for kopf's `stream`: its callback has the same qualified name and fails the same way."""

    def request_cancel_callback(_: object) -> None:
        task = asyncio.current_task()
        assert task is not None  # kopf's own line: false in a done-callback

    return request_cancel_callback


def another_callback(_: object) -> None:
    raise AssertionError("a real bug")


async def fire(callback: object) -> None:
    loop_errors.install(asyncio.get_running_loop())
    stopper: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stopper.add_done_callback(callback)  # type: ignore[arg-type]
    stopper.set_result(None)
    await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
    await asyncio.sleep(0)


async def test_kopfs_stream_cancel_defect_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        await fire(stream())
    assert [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR] == []


async def test_any_other_callback_failure_still_reaches_the_default_handler(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        await fire(another_callback)
    (record,) = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert "another_callback" in record.getMessage()
