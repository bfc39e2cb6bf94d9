"""`pgwarden sidecar`: enforce, from inside a PostgreSQL pod, the policies that select that pod.

Same worker, engine, status, Events and metrics as the central controller; what differs is where
the targets and credentials come from: one pod (its own), one server (over localhost or a socket,
credentials from its own environment), no Secrets, no kopf (no finalizers on shared policies).
A pod is enforced by its sidecar only when annotated `pgwarden.dev/enforcer: sidecar`; the
controller skips exactly those pods, so two enforcers never act on one server. When the annotation
changes, the taker waits `handover_grace` before its first action on the pod, and the sidecar re-reads
its pod right before starting any evaluation (see `PolicyWorker._handover_hold`).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import structlog
from aiohttp import web
from kubernetes.client.exceptions import ApiException

from pgwarden.enforcement import metrics
from pgwarden.enforcement.events import PolicyEvent
from pgwarden.enforcement.kube import EventPoster, PodApi, PolicyApi, PolicyLister, load_api_client
from pgwarden.enforcement.pool import ConnectionPool, dsn_target
from pgwarden.enforcement.status_queue import StatusQueue
from pgwarden.enforcement.status_writer import StatusWriter
from pgwarden.enforcement.targets import PodInfo, pod_info_from
from pgwarden.enforcement.worker import Endpoint, PolicyWorker, TargetEnforcer, wait_for_work
from pgwarden.engine.session import EVALUATION_TIMEOUT_SECONDS
from pgwarden.policy.api import EnforcerKind
from pgwarden.settings import DEFAULTS, Settings

log = structlog.get_logger("pgwarden.sidecar")

LOCAL = Endpoint(host="local", port=0, dbname="", sslmode="", user=None)


class Sidecar:
    def __init__(self, pod_name: str, namespace: str, dsn: str, settings: Settings = DEFAULTS) -> None:
        self.settings = settings
        self.pod_name = pod_name
        self.namespace = namespace
        self.dsn = dsn
        api = load_api_client()
        timeout = settings.api_timeout
        self.pods = PodApi(api, timeout)
        self.policies = PolicyLister(api, timeout)
        self.writer = StatusWriter.configured(PolicyApi(api, timeout), settings)
        self.events = EventPoster(api, "pgwarden-sidecar", pod_name, timeout)
        self.workers: dict[str, PolicyWorker] = {}
        self.statuses: dict[str, StatusQueue] = {}  # each policy's background status writes
        self.bodies: dict[str, dict[str, Any]] = {}  # the latest listed body of each policy
        self.pod: PodInfo | None = None
        self.annotated_since: float | None = None
        self.pod_read_at = float("-inf")
        """When the own pod was last read successfully (monotonic): see `_pod_read_is_usable`."""
        """When this sidecar first saw its pod annotated for it (monotonic), None while it is not."""
        self.concurrency = asyncio.Semaphore(settings.sidecar_concurrency)
        self.api_reachable = False
        """Whether the last read of the own pod and the policies succeeded (reported, never a probe failure)."""
        self.last_error = ""
        self.loop_tick = time.monotonic()
        """When the loop last went round: liveness is the loop turning, not the API server answering."""
        self._pending_events: set[asyncio.Task[None]] = set()
        # One connection to the pod's server for every policy (keyed by the fixed LOCAL endpoint), taking
        # turns, as the controller's policies share one per pod: fewer connections, none to reap by mistake.
        self.pool = ConnectionPool(connect=dsn_target(dsn))

    def make_enforcer(self, endpoint: Endpoint) -> TargetEnforcer:
        return self.pool.acquire(endpoint)

    def _worker(self, name: str) -> PolicyWorker:
        worker = self.workers.get(name)
        if worker is not None:
            return worker

        status = StatusQueue(
            self.writer,
            self.namespace,
            name,
            EnforcerKind.SIDECAR,
            latest=lambda: self.bodies.get(name),
            scope=lambda pod: pod == self.pod_name,
            scope_pod=self.pod_name,
            settings=self.settings,
        )
        self.statuses[name] = status

        def post_event(event: PolicyEvent) -> None:
            task = asyncio.create_task(self.events.post(self.bodies[name], event.type, event.reason, event.message))
            self._pending_events.add(task)
            task.add_done_callback(self._pending_events.discard)

        worker = PolicyWorker(
            namespace=self.namespace,
            name=name,
            secrets=None,
            make_enforcer=self.make_enforcer,
            write_status=status.submit,
            post_event=post_event,
            concurrency=self.concurrency,
            enforcer_kind=EnforcerKind.SIDECAR,
            fixed_endpoint=LOCAL,
            settings=self.settings,
            not_before=self.not_before,
        )
        self.workers[name] = worker
        return worker

    async def refresh_pod(self) -> None:
        """Read the own pod: its annotation says whether this sidecar may act at all (handover)."""
        raw_pod = await self.pods.get(self.namespace, self.pod_name)
        self.pod_read_at = time.monotonic()
        if raw_pod is None:
            log.warning("own pod not found; idle", pod=self.pod_name, namespace=self.namespace)
            self.pod = None
            self.annotated_since = None
            return
        pod = pod_info_from(self.pod_name, self.namespace, raw_pod.get("metadata") or {}, raw_pod.get("status") or {})
        if not pod.sidecar_enforced:
            if self.annotated_since is not None or self.pod is None:
                log.info("pod not annotated pgwarden.dev/enforcer=sidecar; the central controller enforces it; idle")
            self.annotated_since = None
        elif self.annotated_since is None:
            self.annotated_since = time.monotonic()  # the controller may have acted until a moment ago
        # The sidecar is inside the pod: its server is the pod's, whatever the API says of phase and IP.
        self.pod = PodInfo(pod.name, pod.namespace, "Running", pod.pod_ip or "127.0.0.1", pod.labels, pod.annotations)

    def _pod_read_is_usable(self) -> bool:
        """Whether the last successful read of the pod may still decide: the controller takes a pod back only
        `sidecar_release_grace` after it saw the annotation go, so an evaluation started now (ending within
        the evaluation bound) is over before then, if the read is younger than the grace less that bound."""
        age = time.monotonic() - self.pod_read_at
        usable = age < self.settings.sidecar_release_grace - EVALUATION_TIMEOUT_SECONDS - self.settings.sidecar_poll
        if not usable and self.pod is not None:
            log.warning("own pod not read for too long; acting on nothing until it is", seconds=round(age, 1))
        return usable

    def not_before(self) -> float:
        """No evaluation starts before `handover_grace` after this sidecar first saw its pod annotated."""
        since = self.annotated_since if self.annotated_since is not None else time.monotonic()
        return since + self.settings.handover_grace

    async def refresh(self) -> None:
        """Read the own pod and the namespace's policies (every `sidecar_poll` seconds, not every step)."""
        await self.refresh_pod()
        self.bodies = {b["metadata"]["name"]: b for b in await self.policies.list(self.namespace)}
        for gone in [n for n in self.workers if n not in self.bodies]:
            await self.workers.pop(gone).close()  # its connection share and metric series go with it
            await self.statuses.pop(gone).close()
            self.writer.forget(self.namespace, gone)
        self.api_reachable = True
        self.last_error = ""

    async def step(self) -> float:
        """Evaluate what is due on every policy; returns how long to sleep.

        When anything could start, the pod is read again first: an evaluation never starts on an annotation
        older than this step, so after a hand-back the sidecar starts nothing (and drops what is in flight
        at its next step, at most `sidecar_poll` later)."""
        delay = self.settings.sidecar_poll
        if any(self._worker(name).due() for name in self.bodies):
            try:
                await self.refresh_pod()
            except Exception as exc:  # the API server stalls: the last read stands, while it safely can
                status = exc.status if isinstance(exc, ApiException) else type(exc).__name__
                self.api_reachable, self.last_error = False, f"reading the pod failed: {status}"
                if not self._pod_read_is_usable():
                    # Acts on nothing until a read succeeds again, and then only after its own grace: the
                    # annotation may have gone and come back meanwhile.
                    self.pod, self.annotated_since = None, None
        pods = [self.pod] if self.pod is not None else []
        for name, body in sorted(self.bodies.items()):
            delay = min(delay, await self._worker(name).step(body, pods))
        return delay

    async def run(self, stop: asyncio.Event) -> None:
        poll = self.settings.sidecar_poll
        refreshed = float("-inf")
        while not stop.is_set():
            if time.monotonic() - refreshed >= poll:
                refreshed = time.monotonic()
                try:
                    await self.refresh()
                except Exception as exc:  # the API server blinked (or RBAC is missing): report, keep enforcing
                    status = exc.status if isinstance(exc, ApiException) else type(exc).__name__
                    log.warning("reading the pod and policies failed; enforcing the last ones read", error=status)
                    self.api_reachable, self.last_error = False, f"reading the pod and policies failed: {status}"
            try:
                delay = min(await self.step(), max(0.05, refreshed + poll - time.monotonic()))
            except Exception as exc:  # never ends the loop; the next step retries
                log.warning("sidecar step failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                self.last_error = f"step failed: {type(exc).__name__}"
                delay = poll
            self.loop_tick = time.monotonic()
            inflight = [t for w in self.workers.values() for t in w.inflight()]
            await wait_for_work(delay, inflight, stop.wait())
        for worker in self.workers.values():
            await worker.close()
        for status in self.statuses.values():
            await status.close(flush_within=self.settings.api_timeout)


async def _serve_health(sidecar: Sidecar, port: int) -> web.AppRunner:
    # A sidecar must never take its database out of service: the pod's readiness is PostgreSQL's, and the
    # kubelet restarting a sidecar that cannot reach the API server (down, or its RoleBinding missing) would
    # fix nothing. So /healthz fails only when the loop itself stopped turning; what is wrong with the API
    # is in the body and the log.
    stalled_after = max(60.0, 6 * sidecar.settings.sidecar_poll)

    async def healthz(_request: web.Request) -> web.Response:
        alive = time.monotonic() - sidecar.loop_tick < stalled_after
        body = {"loop": alive, "apiReachable": sidecar.api_reachable, "lastError": sidecar.last_error}
        return web.json_response(body, status=200 if alive else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # noqa: S104 - probed by the kubelet
    return runner


async def _main(
    pod_name: str, namespace: str, dsn: str, metrics_port: int, health_port: int, settings: Settings
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sidecar = Sidecar(pod_name, namespace, dsn, settings)
    metrics.serve(metrics_port)
    runner = await _serve_health(sidecar, health_port)
    try:
        await sidecar.run(stop)
    finally:
        await runner.cleanup()


def run_sidecar(
    pod_name: str, namespace: str, dsn: str, metrics_port: int, health_port: int, settings: Settings = DEFAULTS
) -> int:
    asyncio.run(_main(pod_name, namespace, dsn, metrics_port, health_port, settings))
    return 0
