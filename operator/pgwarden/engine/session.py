"""A long-lived engine connection to one target that reconnects after a failure.

`TargetSession` is what the CLI loop and the sidecar hold; `EngineTarget` adapts it to the controller's
`TargetEnforcer` protocol (host/port/credentials from a pod and a Secret, typed report out).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Collection
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from pgwarden.engine.autovacuum import release_autovacuum
from pgwarden.engine.autovacuum_plan import ReleaseReport, WriteAhead
from pgwarden.engine.budget import ActionBudget
from pgwarden.engine.connection import (
    APPLICATION_NAME,
    REQUIRE_AUTH_DEFAULT,
    EngineDsn,
    connect,
    parse_dsn,
    target_of,
)
from pgwarden.engine.cycle import run_cycle
from pgwarden.engine.errors import CycleInterrupted, EngineError, TargetNotConfirmed, TargetUnreachable
from pgwarden.engine.report import CycleReport
from pgwarden.engine.scheduler import DEADLINE_MARGIN
from pgwarden.engine.types import ServerCheck
from pgwarden.policy.model import PolicySpec

EVALUATION_TIMEOUT_SECONDS = 15.0
"""The engine's own deadline on one evaluation (connecting included). Connecting is bounded by
`connect_timeout` (5 s) and each statement by `statement_timeout` (5 s), but a server that stops
answering after the connection was made (a stopped process, a network blackhole) is bounded by neither:
this is. On expiry the connection is shut down under the waiting statement, so the evaluation ends then."""


SEVER_GRACE_SECONDS = 5.0
"""After the socket is shut down psycopg fails at once; this backstop only bounds a path that would not."""


def sever_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut down the connection's socket (through a duplicate descriptor: the original stays psycopg's)."""
    with contextlib.suppress(OSError, psycopg.Error, ValueError):
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


def _sever_then_arm(
    conn: psycopg.AsyncConnection[Any], backstop: asyncio.Timeout, loop: asyncio.AbstractEventLoop
) -> None:
    """The evaluation's deadline: sever the connection, and give the cycle SEVER_GRACE_SECONDS to end."""
    sever_connection(conn)
    with contextlib.suppress(RuntimeError):  # the cycle ended in the same loop turn: nothing left to bound
        backstop.reschedule(loop.time() + SEVER_GRACE_SECONDS)


class TargetSession:
    """One server: connects on first use, and again on the next cycle after the connection broke."""

    def __init__(
        self,
        dsn: EngineDsn,
        *,
        protected_pids: Collection[int] = (),
        evaluation_timeout: float = EVALUATION_TIMEOUT_SECONDS,
    ) -> None:
        self.dsn = dsn
        self.protected_pids = frozenset(protected_pids)
        self.evaluation_timeout = evaluation_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._target = dsn.target
        self._checked: psycopg.AsyncConnection[Any] | None = None  # the connection `ServerCheck` last passed
        self.budget = ActionBudget()
        """Actions per policy in the current window; outlives reconnections (the server remembers nothing)."""

    @property
    def target(self) -> str:
        """`HOST:PORT` as reached (before the first connection: as written in the DSN)."""
        return self._target

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The open connection, or a new one if there is none or the server dropped it while it idled.

        A connection lost between cycles (a server restart, pg_terminate_backend, a proxy's idle timeout)
        is replaced here, silently, once: only a failure of the new one fails the cycle.
        """
        if not self._usable():
            await self.close()
            self._conn = await connect(self.dsn)
            self._target = target_of(self._conn)
        assert self._conn is not None
        return self._conn

    def _usable(self) -> bool:
        """The open connection is there and the server has not spoken on it while it idled."""
        conn = self._conn
        return conn is not None and not conn.closed and not conn.broken and not _dropped_while_idle(conn)

    async def ensure_connected(self) -> None:
        """Connect now if there is no usable connection, within the evaluation bound.

        Callers that share a concurrency limit call this first, so a target that cannot be reached
        waits for (and fails on) its own connection without holding a slot others need.
        """
        if self._usable():
            return  # nothing to wait for, so no timer: it is called twice per evaluation, and a timer is costly
        try:
            async with asyncio.timeout(self.evaluation_timeout):
                await self.connection()
        except TimeoutError:
            await self._abandon()
            raise TargetUnreachable(
                f"{self._target} did not answer within {self.evaluation_timeout:g} s while connecting"
            ) from None

    async def run(
        self,
        spec: PolicySpec,
        *,
        policy: str,
        dry_run_override: bool = False,
        target: str | None = None,
        before_write: WriteAhead | None = None,
        check: ServerCheck | None = None,
    ) -> CycleReport:
        """One cycle, within `evaluation_timeout`; a lost connection is closed so the next call reconnects."""
        started = time.monotonic()
        try:
            conn = self._conn if self._usable() else None  # one check of the socket, not one per helper
            if conn is None:
                await self.ensure_connected()
                conn = await self.connection()
            await self.checked(conn, check, self.evaluation_timeout - (time.monotonic() - started))
            # Past the deadline the socket is shut down under the statement that waits: psycopg sees EOF and
            # fails at once. (Cancelling the task instead makes psycopg send a cancel request and wait for
            # its effect first: up to 10 s more on a server that does not answer.) Only then is the backstop
            # armed, in case severing did not end it: one timer per evaluation, not two.
            remaining = max(0.0, self.evaluation_timeout - (time.monotonic() - started))
            loop = asyncio.get_running_loop()
            backstop = asyncio.timeout(None)
            severing = loop.call_later(remaining, _sever_then_arm, conn, backstop, loop)
            try:
                async with backstop:
                    return await run_cycle(
                        conn,
                        spec,
                        policy=policy,
                        target=target or self._target,
                        dry_run_override=dry_run_override,
                        protected_pids=self.protected_pids,
                        budget=self.budget,
                        before_write=before_write,
                    )
            except Exception as exc:
                if isinstance(exc, CycleInterrupted) or time.monotonic() - started < self.evaluation_timeout:
                    raise  # an interrupted cycle carries what it did: never trade it for a plain timeout
                await self._abandon()
                raise TargetUnreachable(
                    f"{self._target} did not answer within {self.evaluation_timeout:g} s while running the cycle"
                    " (observing and signalling); connection closed"
                ) from None
            finally:
                severing.cancel()
        except CycleInterrupted as exc:  # the report of what was done travels on, redacted like the message
            await self.close()
            exc.report.errors[:] = [self.dsn.redact(e) for e in exc.report.errors]
            raise CycleInterrupted(self.dsn.redact(str(exc)), exc.report) from None
        except TargetUnreachable as exc:  # its kind kept: AuthenticationFailed tells the caller to re-read
            await self.close()
            raise type(exc)(self.dsn.redact(str(exc))) from None
        except EngineError as exc:  # a server message may quote a credential; never pass one on
            raise type(exc)(self.dsn.redact(str(exc))) from None

    async def checked(
        self, conn: psycopg.AsyncConnection[Any], check: ServerCheck | None, within: float
    ) -> psycopg.AsyncConnection[Any]:
        """`conn`, once `check` has passed for it: before the first action on every new connection (a
        reconnect here is silent, so the caller cannot do it beforehand). Raises TargetNotConfirmed."""
        if check is None or self._checked is conn:
            return conn
        try:
            async with asyncio.timeout(max(0.0, within)):
                await check()
        except Exception as exc:
            detail = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__)
            raise TargetNotConfirmed(f"{self._target}: nothing done on a new connection: {detail}") from None
        self._checked = conn
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):  # a broken connection may fail to close; it is gone anyway
                await conn.close()

    async def _abandon(self) -> None:
        """Drop a connection that stopped answering; closing it must not wait on the server either."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error, OSError):
                conn.pgconn.finish()  # libpq closes the socket; no round trip, nothing to wait for
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


def _dropped_while_idle(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server has spoken (or hung up) on a connection that has no statement in flight.

    An idle connection has nothing to read; a readable socket means a FATAL before the server closed it,
    or EOF, or a reset. (A notice would also wake it, needlessly costing one reconnect: harmless.)
    Checked without waiting, and without reading, so nothing is consumed from a healthy connection.
    poll(), not select(): select() refuses descriptors from 1024 up (FD_SETSIZE), which an operator
    with a thousand targets holds, and every connection past that line was taken for dropped and
    reopened on every evaluation.
    """
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)  # POLLHUP and POLLERR are reported regardless
        return bool(poller.poll(0))
    except (psycopg.Error, OSError, ValueError):
        return True


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
        require_auth: str = REQUIRE_AUTH_DEFAULT,
        application_name: str = APPLICATION_NAME,
    ) -> None:
        """`credentials_source` names where user and password came from ("Secret NAME") in messages;
        `require_auth` is the weakest password method sent to the server (`spec.connection.requireAuth`);
        `application_name` tells the server's log which process this is (it must start with "pgwarden")."""
        params: dict[str, Any] = {"host": host, "port": str(port), "dbname": dbname, "sslmode": sslmode}
        if user:
            params["user"] = user
        if password:
            params["password"] = password
        self._session = TargetSession(
            parse_dsn(
                pg_conninfo.make_conninfo(**params),
                credentials_source=credentials_source,
                require_auth=require_auth,
                application_name=application_name,
            )
        )

    @classmethod
    def from_dsn(cls, dsn: str) -> EngineTarget:
        """For the sidecar, which is given a DSN (local socket or localhost) rather than a pod endpoint."""
        target = cls.__new__(cls)
        target._session = TargetSession(parse_dsn(dsn))
        return target

    async def ensure_connected(self) -> None:
        """Connect now if needed (bounded; see `TargetSession.ensure_connected`)."""
        await self._session.ensure_connected()

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """The worker's way to wait for this target's own connection before it takes a shared slot."""
        await self.ensure_connected()
        yield

    async def evaluate(
        self,
        spec: PolicySpec,
        *,
        policy: str,
        target: str,
        before_write: WriteAhead | None = None,
        check: ServerCheck | None = None,
    ) -> tuple[CycleReport, float | None]:
        """Run one cycle; the report and seconds from this call's start until a new cycle is worthwhile."""
        called = time.monotonic()
        report = await self._session.run(spec, policy=policy, target=target, before_write=before_write, check=check)
        if report.next_deadline is None:
            return report, None
        return report, (report.observed_at - called) + report.next_deadline + DEADLINE_MARGIN

    async def release_autovacuum(self, written: int, check: ServerCheck | None = None) -> ReleaseReport:
        """Undo the policy's autovacuum_max_workers (see `pgwarden.engine.autovacuum.release_autovacuum`)."""
        conn = await self._session.checked(await self._session.connection(), check, self._session.evaluation_timeout)
        try:
            report = await release_autovacuum(conn, written)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                await self._session.close()
                detail = self._session.dsn.redact(str(exc).strip())
                raise TargetUnreachable(f"connection to {self._session.target} lost: {detail}") from None
            raise
        return report

    async def close(self) -> None:
        await self._session.close()
