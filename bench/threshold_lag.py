"""Benchmark: how late an idle session is terminated after it crosses its threshold, raced three ways.

One server, the same workloads, in one run. Threshold: idle for 10 s.
  workloads   sparse: 10 sessions that go idle at random moments over a minute (each runs pg_sleep first)
              dense:  100 sessions, the same way
  contenders  pgwarden   the engine's loop (run_loop + TargetSession, as `pgwarden enforce`), interval 30s,
                         stateAge 10s: look-ahead observations once per shortest threshold, a wake-up at
                         each known crossing
              poller     a plain 1 s poller written here: one read of pg_stat_activity and a terminate per
                         victim every second, as fixed-interval tools do
              timeout    PostgreSQL's own idle_session_timeout = 10s set in each session: the floor, no
                         queries at all
For each session, lag = when its socket reports the termination minus (when its last query returned + 10 s),
both on this process's monotonic clock. Also printed: statements each contender sent per minute.

    .venv/bin/python bench/threshold_lag.py [--major 18] [--window 60] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "operator"), str(Path(__file__).resolve().parents[1])]

import psycopg  # noqa: E402

from pgwarden.engine.connection import parse_dsn  # noqa: E402
from pgwarden.engine.report import CycleReport  # noqa: E402
from pgwarden.engine.scheduler import run_loop  # noqa: E402
from pgwarden.engine.session import TargetSession  # noqa: E402
from pgwarden.logs import configure_logging  # noqa: E402
from pgwarden.policy import parse_spec  # noqa: E402
from tests.harness.postgres import PgServer, running_server  # noqa: E402

APP = "bench-lag"
THRESHOLD = 10.0
SPEC = parse_spec(
    {
        "interval": "30s",
        "limits": {"maxActionsPerCycle": 1000, "maxFractionPerCycle": 1.0},
        "sessions": [
            {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": f"{THRESHOLD:g}s"},
        ],
        # Only the benchmark's sessions: the poller's and the harness's own connections are not victims.
        "exclude": {"applicationNames": ["bench-poller", "pgwarden*"]},
    }
)


class Watched:
    """One session: it goes idle when its pg_sleep returns, and ends when the server terminates it."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.idle_since: float | None = None
        self.ended: float | None = None

    @property
    def lag(self) -> float | None:
        if self.idle_since is None or self.ended is None:
            return None
        return self.ended - (self.idle_since + THRESHOLD)

    async def run(self, sleep: float) -> None:
        await self.conn.execute("SELECT pg_sleep(%s)", (sleep,))
        self.idle_since = time.monotonic()
        loop = asyncio.get_running_loop()
        fd = self.conn.pgconn.socket

        def readable() -> None:  # the backend's FATAL message, then EOF
            self.ended = time.monotonic()
            loop.remove_reader(fd)

        loop.add_reader(fd, readable)


async def open_workload(server: PgServer, count: int, *, server_timeout: bool) -> list[Watched]:
    dsn = server.dsn(via_socket=True, application_name=APP)
    watched = []
    for _ in range(count):
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        if server_timeout:
            await conn.execute(f"SET idle_session_timeout = '{THRESHOLD:g}s'")
        watched.append(Watched(conn))
    return watched


async def pgwarden(server: PgServer, stop: asyncio.Event) -> int:
    session = TargetSession(parse_dsn(server.dsn()))
    statements = 0

    def on_report(report: CycleReport) -> None:
        nonlocal statements
        statements += 1 + len(report.actions) + len(report.skipped)

    def on_error(exc: Exception, failures: int) -> bool:
        raise exc

    try:
        await run_loop(
            lambda: session.run(SPEC, policy="bench", dry_run_override=False),
            interval=SPEC.observation_gap(),
            stop=stop,
            on_report=on_report,
            on_error=on_error,
        )
    finally:
        await session.close()
    return statements


async def poller(server: PgServer, stop: asyncio.Event) -> int:
    conn = await psycopg.AsyncConnection.connect(server.dsn(application_name="bench-poller"), autocommit=True)
    statements = 0
    try:
        while not stop.is_set():
            cur = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'idle'"
                " AND now() - state_change >= make_interval(secs => %s)",
                (APP, THRESHOLD),
            )
            statements += 1
            for (pid,) in await cur.fetchall():
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                statements += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        await conn.close()
    return statements


async def nothing(server: PgServer, stop: asyncio.Event) -> int:
    await stop.wait()
    return 0


Contender = Callable[[PgServer, asyncio.Event], Coroutine[Any, Any, int]]


async def race(server: PgServer, name: str, contender: Contender, count: int, window: float, seed: int) -> str:
    rng = random.Random(seed)  # noqa: S311 - the same moments for every contender, not secrets
    sleeps = [rng.uniform(0, window) for _ in range(count)]
    watched = await open_workload(server, count, server_timeout=name == "timeout")
    stop = asyncio.Event()
    started = time.monotonic()
    runner = asyncio.create_task(contender(server, stop))
    await asyncio.gather(*(w.run(s) for w, s in zip(watched, sleeps, strict=True)))
    deadline = time.monotonic() + THRESHOLD + 40
    while any(w.ended is None for w in watched) and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll
        await asyncio.sleep(0.05)
    stop.set()
    statements = await runner
    minutes = (time.monotonic() - started) / 60
    lags = sorted(lag for w in watched if (lag := w.lag) is not None)
    for w in watched:
        await w.conn.close()
    missed = count - len(lags)
    if not lags:
        return f"{name:<9} no session terminated"
    p99 = lags[min(len(lags) - 1, round(0.99 * len(lags)) - 1)]
    return (
        f"{name:<9} lag median {statistics.median(lags):6.2f} s  p99 {p99:6.2f} s  max {lags[-1]:6.2f} s  "
        f"statements/min {statements / minutes:6.1f}" + (f"  ({missed} not terminated)" if missed else "")
    )


async def measure(server: PgServer, window: float, seed: int) -> None:
    contenders: list[tuple[str, Contender]] = [("pgwarden", pgwarden), ("poller", poller), ("timeout", nothing)]
    for workload, count in (("sparse", 10), ("dense", 100)):
        print(f"\n{workload}: {count} sessions going idle at random moments over {window:g} s, threshold 10 s")
        for name, contender in contenders:
            print("  " + await race(server, name, contender, count, window, seed), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--major", default="18")
    parser.add_argument("--window", type=float, default=60.0, help="seconds over which sessions go idle")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    configure_logging("warning")
    with running_server(args.major, settings={"max_connections": "300"}) as server:
        print(f"PostgreSQL {args.major} at {server.host}:{server.port}; pgwarden interval 30s, stateAge 10s")
        asyncio.run(measure(server, args.window, args.seed))


if __name__ == "__main__":
    main()
