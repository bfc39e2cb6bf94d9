"""Long-lived things the handlers share (API client, Secret cache, status writer, engine connections).

Kept in kopf's memo so handlers stay thin and tests can swap any part.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field

from kubernetes import client

from pgwarden.enforcement.activation import ActivationGate
from pgwarden.enforcement.kube import PodAddressCheck, PodApi, PolicyApi, ReportApi, SecretReader
from pgwarden.enforcement.pool import ConnectionPool, controller_application_name, engine_target
from pgwarden.enforcement.status_writer import StatusWriter
from pgwarden.enforcement.worker import Endpoint, TargetEnforcer
from pgwarden.settings import DEFAULTS, Settings


@dataclass
class Runtime:
    settings: Settings = DEFAULTS
    api: client.ApiClient | None = None
    secrets: SecretReader | None = None
    check_pod: PodAddressCheck | None = None
    _writer: StatusWriter | None = None
    loops: dict[tuple[str, str], float] = field(default_factory=dict)
    """When each policy's loop last completed a step (monotonic): /healthz reads it."""
    concurrency: asyncio.Semaphore = field(init=False)
    pool: ConnectionPool = field(default_factory=ConnectionPool)
    identity: str | None = None
    """The replica's name in the peering object; its engine connections are named after it."""
    gate: ActivationGate | None = None
    """Peered replicas only: holds each policy loop's first action (pgwarden.enforcement.activation)."""
    policy_reports: bool = False
    """Whether to keep an openreports Report per policy: the CRDs were found at start and not turned off."""
    reports: ReportApi | None = None

    def __post_init__(self) -> None:
        self.concurrency = asyncio.Semaphore(self.settings.concurrency)
        if self.identity is not None:
            name = controller_application_name(self.identity)
            self.pool.connect = functools.partial(engine_target, application_name=name)

    @property
    def writer(self) -> StatusWriter:
        assert self._writer is not None, "the startup handler binds the status writer"
        return self._writer

    def bind_clients(self, api: client.ApiClient) -> None:
        """The Secret reader and the status writer over `api`, tuned by the settings."""
        self.api = api
        timeout = self.settings.api_timeout
        self.secrets = SecretReader(
            api, ttl=self.settings.secret_cache_ttl, timeout=timeout, stale_max=self.settings.secret_stale_max
        )
        self.check_pod = PodAddressCheck(PodApi(api, timeout))
        self._writer = StatusWriter.configured(PolicyApi(api, timeout), self.settings)
        self.reports = ReportApi(api, timeout) if self.policy_reports else None

    def tick(self, namespace: str, name: str) -> None:
        self.loops[(namespace, name)] = time.monotonic()

    def stalled_loops(self) -> list[str]:
        """Policies whose loop has not completed a step within `loop_stall` seconds."""
        now = time.monotonic()
        return sorted(f"{ns}/{n}" for (ns, n), at in self.loops.items() if now - at > self.settings.loop_stall)

    def make_enforcer(self, endpoint: Endpoint) -> TargetEnforcer:
        return self.pool.acquire(endpoint)

    async def close(self) -> None:
        if self.api is not None:
            await asyncio.to_thread(self.api.close)
