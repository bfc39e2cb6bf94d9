"""Helpers shared by the engine's PostgreSQL tests (this module holds no tests).

Every rule a test writes is scoped to names only that test uses (`unique`), so tests on the shared
server never touch each other's sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pgwarden.engine.connection import connect, parse_dsn, target_of
from pgwarden.engine.cycle import run_cycle
from pgwarden.engine.report import CycleReport
from pgwarden.engine.scheduler import run_loop
from pgwarden.engine.session import TargetSession
from pgwarden.policy import PolicySpec, parse_spec
from tests.harness.postgres import PgServer

_counter = itertools.count()


def unique(request: pytest.FixtureRequest, prefix: str = "t") -> str:
    """A short name (role, database, application) no other test uses; valid as a PostgreSQL identifier."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    return f"{prefix}_{digest}_{next(_counter)}"


def spec_of(**fields: Any) -> PolicySpec:
    """A spec with blast-radius limits opened wide unless the test sets them."""
    fields.setdefault("limits", {"maxActionsPerCycle": 1000, "maxFractionPerCycle": 1.0})
    return parse_spec(fields)


async def enforce(
    server: PgServer,
    spec: PolicySpec,
    *,
    dry_run: bool = False,
    user: str = "postgres",
    protected_pids: tuple[int, ...] = (),
) -> CycleReport:
    """One cycle over TCP, like `pgwarden enforce --once`."""
    conn = await connect(parse_dsn(server.dsn(user=user)))
    try:
        return await run_cycle(
            conn,
            spec,
            policy="test",
            target=target_of(conn),
            dry_run_override=dry_run,
            protected_pids=protected_pids,
        )
    finally:
        await conn.close()


def acted(report: CycleReport) -> set[int]:
    return {a.pid for a in report.actions}


def alive(server: PgServer, pids: set[int] | list[int]) -> set[int]:
    """Which of `pids` pg_stat_activity still shows."""
    rows = server.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),))
    return {r[0] for r in rows}


def wait_all_gone(server: PgServer, pids: set[int] | list[int]) -> None:
    for pid in pids:
        server.wait_gone(pid)


@contextlib.asynccontextmanager
async def looping(
    server: PgServer, spec: PolicySpec, *, interval: float | None = None
) -> AsyncIterator[list[CycleReport]]:
    """The CLI's loop (run_loop + TargetSession) on `server`, reports collected as they come; on exit it is
    stopped (it must end within a second: a sleeping loop wakes at once) and its connection closed.

    `interval`: the loop's longest sleep, by default the spec's observation gap (as `pgwarden enforce`)."""
    target = TargetSession(parse_dsn(server.dsn()))
    stop = asyncio.Event()
    reports: list[CycleReport] = []

    def on_error(exc: Exception, failures: int) -> bool:
        raise exc

    loop = asyncio.create_task(
        run_loop(
            lambda: target.run(spec, policy="test"),
            interval=spec.observation_gap() if interval is None else interval,
            stop=stop,
            on_report=reports.append,
            on_error=on_error,
        )
    )
    try:
        yield reports
    finally:
        stop.set()
        try:
            await asyncio.wait_for(loop, timeout=1.0)
        finally:
            await target.close()
