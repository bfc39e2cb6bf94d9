"""Engine connections shared by every policy that selects the same server.

Connections are the server's scarcest resource, and each costs the process ~35 KB (libpq's buffers), so
policies that select one pod with the same credentials take turns on one connection: 20 policies over
200 pods hold 200 connections, not 4,000. The controller and the sidecar both enforce through this pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pgwarden.enforcement.worker import Endpoint
from pgwarden.engine.autovacuum_plan import ReleaseReport, WriteAhead
from pgwarden.engine.connection import APPLICATION_NAME
from pgwarden.engine.report import CycleReport
from pgwarden.engine.session import EngineTarget
from pgwarden.engine.types import ServerCheck
from pgwarden.policy import PolicySpec


@dataclass
class _Connection:
    target: EngineTarget
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class SharedEnforcer:
    """One policy's handle on the engine connection every policy shares to one endpoint.

    Policies that select the same pod (with the same credentials) use one PostgreSQL connection, taking
    turns: connections are the server's scarcest resource, and each costs the operator ~35 KB (libpq's
    buffers), so 20 policies over 200 pods hold 200 connections, not 4,000.
    """

    def __init__(self, pool: ConnectionPool, endpoint: Endpoint, connection: _Connection) -> None:
        self._pool = pool
        self._endpoint = endpoint
        self._connection: _Connection | None = connection
        self._turn = False  # inside connected(): this policy's turn on the connection is already held

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Wait for this policy's turn on the shared connection, and for the connection itself.

        The worker enters this before it takes an operator-wide concurrency slot: policies queued behind a
        wedged server wait here, holding nothing that other servers' policies need.
        """
        connection = self._use()
        async with connection.lock:
            await connection.target.ensure_connected()
            self._turn = True
            try:
                yield
            finally:
                self._turn = False

    def _use(self) -> _Connection:
        if self._connection is None:
            raise RuntimeError("enforcer used after close()")
        return self._connection

    async def evaluate(
        self,
        spec: PolicySpec,
        *,
        policy: str,
        target: str,
        before_write: WriteAhead | None = None,
        check: ServerCheck | None = None,
    ) -> tuple[CycleReport, float | None]:
        connection = self._use()
        if self._turn:
            return await connection.target.evaluate(
                spec, policy=policy, target=target, before_write=before_write, check=check
            )
        async with connection.lock:  # one statement at a time on a connection; policies take turns
            return await connection.target.evaluate(
                spec, policy=policy, target=target, before_write=before_write, check=check
            )

    async def release_autovacuum(self, written: int, check: ServerCheck | None = None) -> ReleaseReport:
        connection = self._use()
        async with connection.lock:
            return await connection.target.release_autovacuum(written, check)

    async def close(self) -> None:
        """Let go of the connection; the last policy to let go closes it. (A broken one is reopened by
        the engine on its next use, whoever uses it.)"""
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._pool.release(self._endpoint, connection)


def engine_target(endpoint: Endpoint, application_name: str = APPLICATION_NAME) -> EngineTarget:
    """The controller's connection to a pod: everything comes from the Endpoint (pod IP, Secret), and the
    connection is named after the replica (`controller_application_name`)."""
    return EngineTarget(
        host=endpoint.host,
        port=endpoint.port,
        dbname=endpoint.dbname,
        user=endpoint.user,
        password=endpoint.password,
        sslmode=endpoint.sslmode,
        credentials_source=endpoint.credentials_source,
        require_auth=endpoint.require_auth,
        application_name=application_name,
    )


def controller_application_name(identity: str) -> str:
    """`pgwarden/<identity>`: the server's log (and pg_stat_activity) tells which replica a connection is,
    and the prefix keeps it one of pgwarden's own sessions, never signalled. PostgreSQL keeps 63 bytes."""
    return f"{APPLICATION_NAME}/{identity}".encode()[:63].decode(errors="ignore")


def dsn_target(dsn: str) -> Callable[[Endpoint], EngineTarget]:
    """The sidecar's connection: its one server is named by a DSN, whatever the (fixed) Endpoint says.

    With the sidecar's fixed Endpoint as the key, every policy the sidecar enforces shares this one
    connection, as the controller's policies share one per pod (issue: the sidecar opened one per policy,
    and an idle rule of one policy could reap another policy's connection).
    """
    return lambda _endpoint: EngineTarget.from_dsn(dsn)


@dataclass
class ConnectionPool:
    """Engine connections by endpoint (address, port, database, TLS mode, credentials), shared by policies."""

    connections: dict[Endpoint, _Connection] = field(default_factory=dict)
    connect: Callable[[Endpoint], EngineTarget] = engine_target  # how a new endpoint's connection is made

    def acquire(self, endpoint: Endpoint) -> SharedEnforcer:
        connection = self.connections.get(endpoint)
        if connection is None:
            connection = self.connections[endpoint] = _Connection(self.connect(endpoint))
        connection.users += 1
        return SharedEnforcer(self, endpoint, connection)

    async def release(self, endpoint: Endpoint, connection: _Connection) -> None:
        connection.users -= 1
        if connection.users == 0:
            if self.connections.get(endpoint) is connection:
                del self.connections[endpoint]
            await connection.target.close()
