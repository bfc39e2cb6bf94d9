"""Long-lived things the handlers share (API client, Secret cache, status writer, engine connections).

Kept in kopf's memo so handlers stay thin and tests can swap any part.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kubernetes import client

from pgwarden.enforcement.kube import PolicyApi, SecretReader
from pgwarden.enforcement.pool import ConnectionPool
from pgwarden.enforcement.status_writer import StatusWriter
from pgwarden.enforcement.worker import Endpoint, TargetEnforcer

DEFAULT_CONCURRENCY = 32


@dataclass
class Runtime:
    api: client.ApiClient | None = None
    secrets: SecretReader | None = None
    _writer: StatusWriter | None = None
    concurrency: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(DEFAULT_CONCURRENCY))
    pool: ConnectionPool = field(default_factory=ConnectionPool)

    @property
    def writer(self) -> StatusWriter:
        assert self._writer is not None, "the startup handler binds the status writer"
        return self._writer

    def bind_writer(self, policies: PolicyApi) -> None:
        self._writer = StatusWriter(policies)

    def make_enforcer(self, endpoint: Endpoint) -> TargetEnforcer:
        return self.pool.acquire(endpoint)

    async def close(self) -> None:
        if self.api is not None:
            await asyncio.to_thread(self.api.close)
