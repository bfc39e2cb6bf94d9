"""Benchmark: how late a session is terminated after it crosses `stateAge`, under the deadline-aware loop.

Starts its own PostgreSQL, opens 100 idle sessions at random moments over a few seconds, then runs the
engine's loop (the same `run_loop` + `TargetSession` as `pgwarden enforce`) with `interval: 30s` and
`stateAge: 5s`. For each session, lag = the moment its socket reports the server's termination minus
(the moment its last query returned + stateAge), both on this process's monotonic clock. A fixed 30 s
timer would give lags up to 30 s; the target is p99 <= 1.5 s.

    .venv/bin/python bench/threshold_lag.py [--major 18] [--sessions 100] [--spread 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
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
STATE_AGE = 5.0


class Watched:
    """One idle session and the two moments that define its lag."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], idle_since: float) -> None:
        self.conn = conn
        self.crossing = idle_since + STATE_AGE
        self.ended: float | None = None

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = self.conn.pgconn.socket

        def readable() -> None:
            # The backend's FATAL message, then EOF: the session is terminated from the client's view.
            self.ended = time.monotonic()
            loop.remove_reader(fd)

        loop.add_reader(fd, readable)


async def open_sessions(server: PgServer, count: int, spread: float) -> list[Watched]:
    dsn = server.dsn(via_socket=True, application_name=APP)
    start = time.monotonic()
    moments = sorted(random.uniform(0, spread) for _ in range(count))  # noqa: S311 - timing jitter, not secrets
    watched: list[Watched] = []

    async def one(at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await conn.execute("SELECT 1")
        watched.append(Watched(conn, time.monotonic()))

    await asyncio.gather(*(one(at) for at in moments))
    return watched


async def measure(server: PgServer, count: int, spread: float) -> None:
    spec = parse_spec(
        {
            "interval": "30s",
            "limits": {"maxActionsPerCycle": 1000, "maxFractionPerCycle": 1.0},
            "sessions": [
                {
                    "name": "idle",
                    "action": "terminate",
                    "states": ["idle"],
                    "stateAge": f"{STATE_AGE:g}s",
                    "applicationNames": [APP],
                }
            ],
        }
    )
    watched = await open_sessions(server, count, spread)
    loop = asyncio.get_running_loop()
    for w in watched:
        w.watch(loop)
    session = TargetSession(parse_dsn(server.dsn()))
    stop = asyncio.Event()
    cycles: list[CycleReport] = []

    def on_report(report: CycleReport) -> None:
        cycles.append(report)
        if all(w.ended is not None for w in watched):
            stop.set()

    def on_error(exc: Exception, failures: int) -> bool:
        raise exc

    async def watchdog() -> None:
        deadline = time.monotonic() + STATE_AGE + spread + 40
        while not stop.is_set() and time.monotonic() < deadline:
            if all(w.ended is not None for w in watched):
                stop.set()
            await asyncio.sleep(0.05)
        stop.set()

    dog = asyncio.create_task(watchdog())
    await run_loop(
        lambda: session.run(spec, policy="bench", dry_run_override=False),
        interval=spec.interval.total_seconds(),
        stop=stop,
        on_report=on_report,
        on_error=on_error,
    )
    await dog
    await session.close()
    lags = sorted(w.ended - w.crossing for w in watched if w.ended is not None)
    for w in watched:
        await w.conn.close()
    missed = count - len(lags)
    p99 = lags[min(len(lags) - 1, round(0.99 * len(lags)) - 1)] if lags else float("nan")
    print(f"{count} sessions crossing stateAge {STATE_AGE:g}s over {spread:g}s, interval 30s, {len(cycles)} cycles")
    print(
        f"  lag median {statistics.median(lags):.3f} s   p99 {p99:.3f} s   max {lags[-1]:.3f} s   min {lags[0]:.3f} s"
    )
    if missed:
        print(f"  {missed} sessions were not terminated in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--major", default="18")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--spread", type=float, default=4.0, help="seconds over which the sessions are opened")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.spread >= STATE_AGE:
        parser.error("--spread must be shorter than stateAge, so the first cycle sees every session")
    random.seed(args.seed)
    configure_logging("warning")
    with running_server(args.major, settings={"max_connections": str(args.sessions + 50)}) as server:
        print(f"PostgreSQL {args.major} at {server.host}:{server.port}")
        asyncio.run(measure(server, args.sessions, args.spread))


if __name__ == "__main__":
    main()
