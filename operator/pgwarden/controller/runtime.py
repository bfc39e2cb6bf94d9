"""Long-lived things the handlers share (API client, Secret cache, status writer, engine factory).

Kept in kopf's memo so handlers stay thin and tests can swap any part.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kubernetes import client

from pgwarden.controller.kube import PolicyApi, SecretReader
from pgwarden.controller.status_writer import StatusWriter
from pgwarden.controller.worker import Endpoint, TargetEnforcer
from pgwarden.engine.session import EngineTarget

DEFAULT_CONCURRENCY = 32


@dataclass
class Runtime:
    api: client.ApiClient | None = None
    secrets: SecretReader | None = None
    _writer: StatusWriter | None = None
    concurrency: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(DEFAULT_CONCURRENCY))

    @property
    def writer(self) -> StatusWriter:
        assert self._writer is not None, "the startup handler binds the status writer"
        return self._writer

    def bind_writer(self, policies: PolicyApi) -> None:
        self._writer = StatusWriter(policies)

    def make_enforcer(self, endpoint: Endpoint) -> TargetEnforcer:
        return EngineTarget(
            host=endpoint.host,
            port=endpoint.port,
            dbname=endpoint.dbname,
            user=endpoint.user,
            password=endpoint.password,
            sslmode=endpoint.sslmode,
        )

    async def close(self) -> None:
        if self.api is not None:
            await asyncio.to_thread(self.api.close)
