"""Benchmark: what one engine cycle costs next to one bare read of pg_stat_activity.

Starts its own PostgreSQL (tests.harness), opens 1,000 and then 5,000 idle client sessions, and measures
on one engine connection, interleaved in the same run:
  floor    median of `SELECT count(*) FROM pg_stat_activity`
  nothing  median cycle (observe, decide, act, report) when no session matches any rule
  all      median cycle when every session matches, under maxActionsPerCycle: 50 (the 50 terminated
           sessions are replaced between iterations, untimed)
Target: nothing / floor <= 2.0.

    .venv/bin/python bench/engine_cycle.py [--major 18] [--sizes 1000,5000] [--iterations 40]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "operator"), str(Path(__file__).resolve().parents[1])]

import psycopg  # noqa: E402

from pgwarden.engine.connection import connect, parse_dsn  # noqa: E402
from pgwarden.engine.cycle import run_cycle  # noqa: E402
from pgwarden.logs import configure_logging  # noqa: E402
from pgwarden.policy import parse_spec  # noqa: E402
from tests.harness.postgres import PgServer, running_server  # noqa: E402

APP = "bench-idle"
NOTHING = parse_spec(
    {
        "sessions": [
            {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "10m"},
            {"name": "idle-in-tx", "action": "terminate", "states": ["idle in transaction"], "stateAge": "5m"},
            {"name": "long-query", "action": "cancel", "states": ["active"], "queryAge": "15m"},
        ],
        "connectionLimits": [{"name": "per-user", "groupBy": "user", "max": 100000}],
        "exclude": {"applicationNames": ["pgwarden*"]},
    }
)
BLOCKERS = parse_spec(  # NOTHING plus a blocker-aware rule that matches nothing (its wait is far off)
    {
        **NOTHING.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "sessions": [
            *NOTHING.model_dump(by_alias=True, exclude_none=True, mode="json")["sessions"],
            {"name": "blockers", "action": "terminate", "blocking": {"minBlocked": 1, "minWait": "1h"}},
        ],
    }
)
WAITERS = 50
EVERYTHING = parse_spec(
    {
        "limits": {"maxActionsPerCycle": 50, "maxFractionPerCycle": 1.0},
        "sessions": [{"name": "all", "action": "terminate", "applicationNames": [APP], "connectionAge": "0s"}],
    }
)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


class Pool:
    """Idle client sessions held open over the Unix socket (cheap to open, irrelevant to the engine)."""

    def __init__(self, server: PgServer) -> None:
        self.dsn = server.dsn(via_socket=True, application_name=APP)
        self.conns: list[psycopg.AsyncConnection[Any]] = []

    async def _open_one(self, sem: asyncio.Semaphore) -> None:
        async with sem:
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            await conn.execute("SELECT 1")
            self.conns.append(conn)

    async def grow_to(self, size: int) -> None:
        self.conns = [c for c in self.conns if not c.closed and not c.broken]
        sem = asyncio.Semaphore(32)
        await asyncio.gather(*(self._open_one(sem) for _ in range(size - len(self.conns))))

    async def refill(self, size: int) -> None:
        """Replace the sessions the engine terminated (a dead connection only notices when used)."""
        alive = []
        for conn in self.conns:
            try:
                await conn.execute("SELECT 1")
                alive.append(conn)
            except psycopg.Error:
                await conn.close()
        self.conns = alive
        await self.grow_to(size)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.conns), return_exceptions=True)


async def timed(coro_fn: Any) -> float:
    start = time.perf_counter()
    await coro_fn()
    return time.perf_counter() - start


async def measure(server: PgServer, sizes: list[int], iterations: int) -> None:
    pool = Pool(server)
    engine = await connect(parse_dsn(server.dsn()))
    target = f"{server.host}:{server.port}"
    try:
        for size in sizes:
            started = time.perf_counter()
            await pool.grow_to(size)
            # Let state_change age a little, then settle: all idle, none matching the 'nothing' policy.
            print(f"\n{size} idle sessions open ({time.perf_counter() - started:.1f} s)")

            async def floor() -> None:
                cur = await engine.execute("SELECT count(*) FROM pg_stat_activity")
                await cur.fetchall()

            async def nothing() -> None:
                report = await run_cycle(engine, NOTHING, policy="bench", target=target)
                assert not report.actions, report.actions[:3]

            for _ in range(10):  # warm-up: plan caches, psycopg's prepared statements
                await floor()
                await nothing()
            floors, cycles = [], []
            for _ in range(iterations):
                floors.append(await timed(floor))
                cycles.append(await timed(nothing))
            f, c = statistics.median(floors), statistics.median(cycles)
            print(f"  floor   SELECT count(*) FROM pg_stat_activity  median {f * 1000:8.2f} ms")
            print(f"  nothing matches                              median {c * 1000:8.2f} ms   ratio {c / f:.2f}")

            all_cycles, acted = [], []
            for _ in range(max(10, iterations // 2)):
                await pool.refill(size)
                start = time.perf_counter()
                report = await run_cycle(engine, EVERYTHING, policy="bench", target=target)
                all_cycles.append(time.perf_counter() - start)
                acted.append(sum(a.done for a in report.actions))
            a = statistics.median(all_cycles)
            print(
                f"  everything matches, maxActionsPerCycle 50   median {a * 1000:8.2f} ms   "
                f"(terminated {statistics.median(acted):.0f}, skipped ~{size - 50} per cycle)"
            )
            await pool.refill(size)
            if size == sizes[0]:
                await measure_blocking(server, engine, target, iterations)
    finally:
        await engine.close()
        await pool.close()


async def measure_blocking(server: PgServer, engine: Any, target: str, iterations: int) -> None:
    """The observation with a `blocking` rule: with no waiter (the common case) and with WAITERS sessions
    queued on one row lock (pg_blocking_pids and pg_locks are evaluated for waiting sessions only)."""

    async def cycle() -> None:
        report = await run_cycle(engine, BLOCKERS, policy="bench", target=target)
        assert not report.actions, report.actions[:3]

    async def median() -> float:
        for _ in range(5):
            await cycle()
        return statistics.median([await timed(cycle) for _ in range(iterations)])

    print(f"  blocking rule, 0 waiters                     median {await median() * 1000:8.2f} ms")
    dsn = server.dsn(via_socket=True, application_name="bench-lock")
    holder = await psycopg.AsyncConnection.connect(dsn)
    await holder.execute("CREATE TABLE IF NOT EXISTS bench_lock (id int PRIMARY KEY)")
    await holder.execute("INSERT INTO bench_lock VALUES (1) ON CONFLICT DO NOTHING")
    await holder.commit()
    await holder.execute("UPDATE bench_lock SET id = 1 WHERE id = 1")  # holds the row lock, transaction open
    waiters = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(WAITERS)]
    queued = [asyncio.create_task(w.execute("UPDATE bench_lock SET id = 1 WHERE id = 1")) for w in waiters]
    try:
        while True:  # every waiter is queued before anything is measured
            cur = await engine.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            row = await cur.fetchone()
            if row is not None and row[0] >= WAITERS:
                break
            await asyncio.sleep(0.05)
        print(f"  blocking rule, {WAITERS} waiters on one lock        median {await median() * 1000:8.2f} ms")
    finally:
        await holder.rollback()
        await asyncio.gather(*queued, return_exceptions=True)
        await asyncio.gather(*(w.close() for w in waiters), holder.close())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--major", default="18")
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    raise_fd_limit(max(sizes) + 1000)
    configure_logging("warning")  # every terminated session is logged at info; not what is measured here
    settings = {"max_connections": str(max(sizes) + 200), "shared_buffers": "128MB"}
    with running_server(args.major, settings=settings) as server:
        print(f"PostgreSQL {args.major} at {server.host}:{server.port}, max_connections {settings['max_connections']}")
        asyncio.run(measure(server, sizes, args.iterations))


if __name__ == "__main__":
    main()
