"""The deadline-aware loop on a real server: a session crossing stateAge goes within about a second."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.harness.engine import looping, spec_of, unique
from tests.harness.postgres import PgServer

pytestmark = pytest.mark.pg


async def test_session_is_terminated_soon_after_crossing_state_age_not_at_the_interval(
    pg: PgServer, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    spec = spec_of(
        interval="30s",
        sessions=[
            {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "2s", "applicationNames": [app]}
        ],
    )
    session = pg.open_session("idle", application_name=app)
    opened = time.monotonic()
    async with looping(pg, spec, interval=spec.interval.total_seconds()) as reports:
        deadline = opened + 3.5
        while await asyncio.to_thread(pg.alive, session.pid):
            assert time.monotonic() < deadline, f"still there after 3.5 s ({len(reports)} cycles)"
            await asyncio.sleep(0.05)
        gone_after = time.monotonic() - opened
        assert gone_after >= 1.8  # never before the threshold
    # Leaving `looping` stopped the loop within a second: a sleeping loop wakes at once, not after its 30 s.
    # Reports are read only now: the backend exits while the wake that signalled it is still being read, so
    # inside the block its report may not have arrived yet (a stopped loop finishes its cycle first).
    assert [a.pid for r in reports for a in r.actions] == [session.pid]
    assert reports[0].next_deadline is not None
    assert reports[0].next_deadline <= 2.0
