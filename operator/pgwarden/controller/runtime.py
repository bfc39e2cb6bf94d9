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
from pgwarden.settings import DEFAULTS, Settings


@dataclass
class Runtime:
    settings: Settings = DEFAULTS
    api: client.ApiClient | None = None
    secrets: SecretReader | None = None
    _writer: StatusWriter | None = None
    concurrency: asyncio.Semaphore = field(init=False)
    pool: ConnectionPool = field(default_factory=ConnectionPool)

    def __post_init__(self) -> None:
        self.concurrency = asyncio.Semaphore(self.settings.concurrency)

    @property
    def writer(self) -> StatusWriter:
        assert self._writer is not None, "the startup handler binds the status writer"
        return self._writer

    def bind_clients(self, api: client.ApiClient) -> None:
        """The Secret reader and the status writer over `api`, tuned by the settings."""
        self.api = api
        self.secrets = SecretReader(api, ttl=self.settings.secret_cache_ttl)
        self._writer = StatusWriter.configured(PolicyApi(api), self.settings)

    def make_enforcer(self, endpoint: Endpoint) -> TargetEnforcer:
        return self.pool.acquire(endpoint)

    async def close(self) -> None:
        if self.api is not None:
            await asyncio.to_thread(self.api.close)
