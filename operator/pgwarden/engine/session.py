"""A long-lived engine connection to one target that reconnects after a failure.

`TargetSession` is what the CLI loop and the sidecar hold; `EngineTarget` adapts it to the controller's
`TargetEnforcer` protocol (host/port/credentials from a pod and a Secret, JSON report out).
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Collection
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from pgwarden.engine.autovacuum import release_autovacuum
from pgwarden.engine.connection import EngineDsn, connect, parse_dsn, target_of
from pgwarden.engine.cycle import run_cycle
from pgwarden.engine.errors import EngineError, TargetUnreachable
from pgwarden.engine.report import CycleReport
from pgwarden.engine.scheduler import DEADLINE_MARGIN
from pgwarden.policy.model import PolicySpec


class TargetSession:
    """One server: connects on first use, and again on the next cycle after the connection broke."""

    def __init__(self, dsn: EngineDsn, *, protected_pids: Collection[int] = ()) -> None:
        self.dsn = dsn
        self.protected_pids = frozenset(protected_pids)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._target = dsn.target

    @property
    def target(self) -> str:
        """`HOST:PORT` as reached (before the first connection: as written in the DSN)."""
        return self._target

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The open connection, or a new one if there is none or the server dropped it while it idled.

        A connection lost between cycles (a server restart, pg_terminate_backend, a proxy's idle timeout)
        is replaced here, silently, once: only a failure of the new one fails the cycle.
        """
        if self._conn is None or self._conn.closed or self._conn.broken or _dropped_while_idle(self._conn):
            await self.close()
            self._conn = await connect(self.dsn)
            self._target = target_of(self._conn)
        return self._conn

    async def run(
        self, spec: PolicySpec, *, policy: str, dry_run_override: bool = False, target: str | None = None
    ) -> CycleReport:
        """One cycle; a lost connection is closed so the next call reconnects."""
        try:
            conn = await self.connection()
            return await run_cycle(
                conn,
                spec,
                policy=policy,
                target=target or self._target,
                dry_run_override=dry_run_override,
                protected_pids=self.protected_pids,
            )
        except TargetUnreachable as exc:
            await self.close()
            raise TargetUnreachable(self.dsn.redact(str(exc))) from None
        except EngineError as exc:  # a server message may quote a credential; never pass one on
            raise type(exc)(self.dsn.redact(str(exc))) from None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):  # a broken connection may fail to close; it is gone anyway
                await conn.close()


def _dropped_while_idle(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server has spoken (or hung up) on a connection that has no statement in flight.

    An idle connection has nothing to read; a readable socket means a FATAL before the server closed it,
    or EOF, or a reset. (A notice would also wake it, needlessly costing one reconnect: harmless.)
    Checked without waiting, and without reading, so nothing is consumed from a healthy connection.
    """
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (psycopg.Error, OSError, ValueError):
        return True
    return bool(readable)


class EngineTarget:
    """The controller's enforcer for one pod (see `pgwarden.enforcement.worker.TargetEnforcer`)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        dbname: str,
        user: str | None,
        password: str | None,
        sslmode: str,
        credentials_source: str | None = None,
    ) -> None:
        """`credentials_source` names where user and password came from ("Secret NAME") in messages."""
        params: dict[str, Any] = {"host": host, "port": str(port), "dbname": dbname, "sslmode": sslmode}
        if user:
            params["user"] = user
        if password:
            params["password"] = password
        self._session = TargetSession(
            parse_dsn(pg_conninfo.make_conninfo(**params), credentials_source=credentials_source)
        )

    @classmethod
    def from_dsn(cls, dsn: str) -> EngineTarget:
        """For the sidecar, which is given a DSN (local socket or localhost) rather than a pod endpoint."""
        target = cls.__new__(cls)
        target._session = TargetSession(parse_dsn(dsn))
        return target

    async def evaluate(self, spec: PolicySpec, *, policy: str, target: str) -> tuple[dict[str, Any], float | None]:
        """Run one cycle; the JSON report and seconds from this call's start until a new cycle is worthwhile."""
        called = time.monotonic()
        report = await self._session.run(spec, policy=policy, target=target)
        if report.next_deadline is None:
            return report.to_json(), None
        return report.to_json(), (report.observed_at - called) + report.next_deadline + DEADLINE_MARGIN

    async def release_autovacuum(self, written: int) -> dict[str, Any]:
        """Undo the policy's autovacuum_max_workers (see `pgwarden.engine.autovacuum.release_autovacuum`)."""
        conn = await self._session.connection()
        try:
            report = await release_autovacuum(conn, written)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                await self._session.close()
                detail = self._session.dsn.redact(str(exc).strip())
                raise TargetUnreachable(f"connection to {self._session.target} lost: {detail}") from None
            raise
        return report.to_json()

    async def close(self) -> None:
        await self._session.close()
