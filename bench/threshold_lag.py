"""Benchmark: how late a session is acted on after it crosses its threshold, raced three ways, and at what cost.

One server, the same workloads, in one run. Threshold: 10 s in every rule.
  workloads   sparse: 10 sessions that go idle at random moments over a minute
              dense:  100 sessions, the same way
              mixed:  30 sessions: 10 go idle, 10 go idle in a transaction, 10 start a query that would run
                      for ten minutes, each at a random moment over a minute
  contenders  pgwarden   `pgwarden enforce` (the CLI loop, a subprocess), interval 30s, one rule per kind:
                         terminate idle, terminate idle in transaction, cancel active (each stateAge 10s)
              poller     a plain 1 s poller (a subprocess of this script): one read of pg_stat_activity and a
                         terminate or cancel per victim every second, as fixed-interval tools do
              timeout    PostgreSQL's own idle_session_timeout, idle_in_transaction_session_timeout and
                         statement_timeout = 10s set in each session: the floor, no queries at all
Measured per contender:
  lag         from the server's log: the time of the line the victim's backend wrote when it obeyed (FATAL
              terminating connection / ERROR canceling statement) minus (its state_change + 10 s), state_change
              read from pg_stat_activity by a monitor connection once the session is in its state
  statements  per minute, from pg_stat_statements for the contender's own role (every statement it sent,
              connection set-up included), over the whole race
  CPU         the contender process's CPU seconds per minute (user + system), and its backends' on the server

    .venv/bin/python bench/threshold_lag.py [--major 18] [--window 60] [--seed 1] [--workloads sparse,dense,mixed]
PGWARDEN_BENCH_STATEMENTS=1 also lists each contender's statements (pg_stat_statements: calls, text).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT)]

import psycopg  # noqa: E402
import yaml  # noqa: E402
from psycopg import sql  # noqa: E402

from tests.harness.ledger import Ledger  # noqa: E402
from tests.harness.postgres import PgServer, running_server  # noqa: E402

THRESHOLD = 10.0
WORKLOAD_APP = "bench-lag"
WAITING_APP = "bench-waiting"
MONITOR_APP = "bench-monitor"
ROLES = {"pgwarden": "bench_pgwarden", "poller": "bench_poller", "timeout": "bench_app"}
APP_ROLE = "bench_app"
KINDS = ("idle", "idle in transaction", "active")
OBEYED = {
    "terminating connection due to administrator command",
    "canceling statement due to user request",
    "terminating connection due to idle-session timeout",
    "terminating connection due to idle-in-transaction timeout",
    "canceling statement due to statement timeout",
}
POLICY = {
    "apiVersion": "pgwarden.dev/v1alpha1",
    "kind": "PostgresPolicy",
    "metadata": {"name": "bench"},
    "spec": {
        "interval": "30s",
        "limits": {"maxActionsPerCycle": 1000, "maxFractionPerCycle": 1.0},
        "sessions": [
            {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": f"{THRESHOLD:g}s"},
            {"name": "idle-tx", "action": "terminate", "states": ["idle in transaction"], "stateAge": "10s"},
            {"name": "long", "action": "cancel", "states": ["active"], "stateAge": f"{THRESHOLD:g}s"},
        ],
        "exclude": {"applicationNames": [MONITOR_APP, WAITING_APP, "bench-poller", "pgwarden*"], "users": ["postgres"]},
    },
}
POLLER_QUERY = (
    "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s"
    " AND state IN ('idle', 'idle in transaction', 'active') AND now() - state_change >= make_interval(secs => %s)"
)


@dataclass
class Watched:
    """One workload session: what it does, when the server says it entered that state, and its backend."""

    kind: str
    conn: psycopg.AsyncConnection[Any]
    pid: int
    entered: datetime | None = None


async def open_workload(server: PgServer, kinds: list[str]) -> list[Watched]:
    """The sessions, connected under an application name no contender touches until they enter their state."""
    watched = []
    dsn = server.dsn(user=APP_ROLE, via_socket=True, application_name=WAITING_APP)
    for kind in kinds:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=kind != "idle in transaction")
        watched.append(Watched(kind, conn, conn.info.backend_pid))
    return watched


async def enter(w: Watched, delay: float, monitor: psycopg.AsyncConnection[Any], *, server_timeouts: bool) -> None:
    """Wait `delay` on the client, then enter the state, and read when the server says it entered it."""
    await asyncio.sleep(delay)
    if server_timeouts:
        for setting in ("idle_session_timeout", "idle_in_transaction_session_timeout", "statement_timeout"):
            await w.conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(setting), sql.Literal(f"{THRESHOLD:g}s")))
        if w.kind == "idle in transaction":
            await w.conn.commit()
    # Idle after it (autocommit), idle in a transaction (not), or a moment before the long query.
    await w.conn.execute(sql.SQL("SET application_name = {}").format(sql.Literal(WORKLOAD_APP)))
    running = asyncio.create_task(w.conn.execute("SELECT pg_sleep(600)")) if w.kind == "active" else None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        cur = await monitor.execute("SELECT state, state_change FROM pg_stat_activity WHERE pid = %s", (w.pid,))
        row = await cur.fetchone()
        if row is not None and row[0] == w.kind:
            w.entered = row[1]
            break
        await asyncio.sleep(0.005)
    if running is not None:
        with contextlib.suppress(psycopg.Error):  # cancelled by a contender: the point of the exercise
            await running
        await w.conn.close()  # done: left open, the idle rule would end it later and count twice


def obeyed_at(ledger: Ledger, pids: set[int]) -> dict[int, datetime]:
    """When each backend logged that it obeyed a signal or its own timeout (the first such line)."""
    found: dict[int, datetime] = {}
    for entry in ledger.entries():
        if entry.pid in pids and entry.pid not in found and entry.message in OBEYED:
            found[entry.pid] = entry.at.replace(tzinfo=UTC)
    return found


async def pg_stat_statements_calls(admin: psycopg.AsyncConnection[Any], role: str) -> int:
    cur = await admin.execute(
        "SELECT coalesce(sum(calls), 0)::int FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid"
        " WHERE r.rolname = %s",
        (role,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def backend_cpu(admin: psycopg.AsyncConnection[Any], role: str) -> float:
    """CPU seconds (user + system) of the role's backends so far, from /proc (the server runs on this machine)."""
    cur = await admin.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s", (role,))
    return sum(_cpu_seconds(pid) for (pid,) in await cur.fetchall())


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_contender(name: str, server: PgServer, policy_file: Path) -> subprocess.Popen[bytes] | None:
    dsn = server.dsn(user=ROLES[name], application_name="bench-poller") if name == "poller" else server.dsn(ROLES[name])
    if name == "pgwarden":
        command = [str(Path(sys.executable).parent / "pgwarden"), "enforce", "--dsn", dsn, "--policy", str(policy_file)]
        command += ["--output", "json", "--log-level", "warning"]
    elif name == "poller":
        command = [sys.executable, __file__, "--poller", dsn]
    else:
        return None
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT}"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)


def stop_contender(process: subprocess.Popen[bytes] | None) -> float:
    """Stop it (SIGTERM: a clean exit) and return its CPU seconds."""
    if process is None:
        return 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@dataclass
class Result:
    lags: list[float]
    missed: int
    minutes: float
    statements: int
    cpu: float
    server_cpu: float

    def line(self, name: str) -> str:
        if not self.lags:
            return f"{name:<9} nothing acted on"
        lags = sorted(self.lags)
        p99 = lags[min(len(lags) - 1, max(0, round(0.99 * len(lags)) - 1))]
        return (
            f"{name:<9} lag median {statistics.median(lags):5.3f} s  p99 {p99:5.3f} s  max {lags[-1]:5.3f} s  "
            f"statements/min {self.statements / self.minutes:6.1f}  CPU s/min {self.cpu / self.minutes:5.2f}"
            f" (server {self.server_cpu / self.minutes:5.2f})" + (f"  ({self.missed} missed)" if self.missed else "")
        )


async def race(server: PgServer, name: str, kinds: list[str], window: float, seed: int, policy: Path) -> Result:
    rng = random.Random(seed)  # noqa: S311 - the same moments for every contender, not secrets
    delays = [rng.uniform(0, window) for _ in kinds]
    admin = await psycopg.AsyncConnection.connect(server.dsn(application_name=MONITOR_APP), autocommit=True)
    monitor = await psycopg.AsyncConnection.connect(server.dsn(application_name=MONITOR_APP), autocommit=True)
    watched = await open_workload(server, kinds)
    await admin.execute("SELECT pg_stat_statements_reset()")
    ledger = Ledger(server.logfile)
    started = time.monotonic()
    process = start_contender(name, server, policy)
    try:
        timeouts = name == "timeout"
        await asyncio.gather(
            *(enter(w, d, monitor, server_timeouts=timeouts) for w, d in zip(watched, delays, strict=True))
        )
        pids = {w.pid for w in watched}
        deadline = time.monotonic() + THRESHOLD + 40
        while len(obeyed_at(ledger, pids)) < len(pids) and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll
            await asyncio.sleep(0.1)
        server_cpu = await backend_cpu(admin, ROLES[name]) if process is not None else 0.0
    finally:
        cpu = stop_contender(process)
    minutes = (time.monotonic() - started) / 60
    statements = await pg_stat_statements_calls(admin, ROLES[name]) if process is not None else 0
    if os.environ.get("PGWARDEN_BENCH_STATEMENTS") and process is not None:
        cur = await admin.execute(
            "SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_statements s"
            " JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = %s ORDER BY calls DESC",
            (ROLES[name],),
        )
        for calls, query in await cur.fetchall():
            print(f"    {calls:5d} {query}")
    obeyed = obeyed_at(ledger, {w.pid for w in watched})
    lags = [
        (obeyed[w.pid] - (w.entered + timedelta(seconds=THRESHOLD))).total_seconds()
        for w in watched
        if w.entered is not None and w.pid in obeyed
    ]
    for w in watched:
        await w.conn.close()
    await admin.close()
    await monitor.close()
    return Result(lags, len(watched) - len(lags), minutes, statements, cpu, server_cpu)


WORKLOADS: dict[str, list[str]] = {
    "sparse": ["idle"] * 10,
    "dense": ["idle"] * 100,
    "mixed": [kind for kind in KINDS for _ in range(10)],
}


async def measure(server: PgServer, window: float, seed: int, workloads: list[str], policy: Path) -> None:
    for workload in workloads:
        kinds = WORKLOADS[workload]
        print(f"\n{workload}: {len(kinds)} sessions entering their state at random moments over {window:g} s")
        for name in ("pgwarden", "poller", "timeout"):
            result = await race(server, name, kinds, window, seed, policy)
            print("  " + result.line(name), flush=True)


def prepare(server: PgServer) -> None:
    server.execute("CREATE EXTENSION pg_stat_statements")
    for role in {*ROLES.values(), APP_ROLE}:
        server.execute(f"CREATE ROLE {role} LOGIN")
    for role in ("bench_pgwarden", "bench_poller"):
        server.execute(f"GRANT pg_signal_backend, pg_read_all_stats TO {role}")


async def poll_forever(dsn: str) -> None:
    """The 1 s poller contender: read, signal each victim, sleep a second; until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            cur = await conn.execute(POLLER_QUERY, (WORKLOAD_APP, THRESHOLD))
            for pid, state in await cur.fetchall():
                function = "pg_cancel_backend" if state == "active" else "pg_terminate_backend"
                await conn.execute(sql.SQL("SELECT {}(%s)").format(sql.Identifier(function)), (pid,))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--major", default="18")
    parser.add_argument("--window", type=float, default=60.0, help="seconds over which sessions enter their state")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workloads", default="sparse,dense,mixed")
    parser.add_argument("--poller", metavar="DSN", help=argparse.SUPPRESS)  # the poller contender's process
    args = parser.parse_args()
    if args.poller:
        asyncio.run(poll_forever(args.poller))
        return
    settings = {
        "max_connections": "300",
        "shared_preload_libraries": "'pg_stat_statements'",
        "pg_stat_statements.track_utility": "on",
        "log_line_prefix": "'%m|%p|%u|%a|'",
        "log_timezone": "'UTC'",
    }
    with running_server(args.major, settings=settings) as server, tempfile.TemporaryDirectory() as tmp:
        prepare(server)
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(yaml.safe_dump(POLICY))
        print(f"PostgreSQL {args.major}, threshold {THRESHOLD:g} s, pgwarden interval 30s")
        asyncio.run(measure(server, args.window, args.seed, args.workloads.split(","), policy))


if __name__ == "__main__":
    main()
