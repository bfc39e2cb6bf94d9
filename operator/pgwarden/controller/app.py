"""`pgwarden run`: start the central controller (kopf) with metrics and health endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import kopf
import structlog
from kubernetes import client

from pgwarden.controller import loop_errors
from pgwarden.controller.constants import PEERING_NAME
from pgwarden.controller.identity import peering_identity
from pgwarden.controller.runtime import Runtime
from pgwarden.enforcement import metrics
from pgwarden.enforcement.activation import ActivationGate, watch_own_record
from pgwarden.enforcement.kube import PeeringUnavailable, ensure_peering, load_api_client, reports_served
from pgwarden.policy.api import REPORT_KIND, REPORTS_API_VERSION
from pgwarden.settings import DEFAULTS, Settings

log = structlog.get_logger("pgwarden.controller")

__all__ = ["PeeringUnavailable", "run_controller"]


def run_controller(
    namespaces: Sequence[str],
    all_namespaces: bool,
    metrics_port: int,
    health_port: int,
    standalone: bool = False,
    settings: Settings = DEFAULTS,
) -> int:
    """Run until SIGINT/SIGTERM. Without namespaces and without --all-namespaces, watch all namespaces.

    Unless `standalone`, the peering object must exist (or be created here) before kopf starts: raises
    PeeringUnavailable when it cannot be, so that no replica ever runs unpeered beside another.
    """
    from pgwarden.controller import handlers  # noqa: F401 - importing registers the handlers

    clusterwide = all_namespaces or not namespaces
    identity = peering_identity()
    api = load_api_client()
    if not standalone:
        outcomes = ensure_peering(api, PEERING_NAME, None if clusterwide else list(namespaces))
        log.info("peering object", name=PEERING_NAME, clusterwide=clusterwide, outcomes=outcomes)
    policy_reports = _policy_reports(api, settings)
    metrics.serve(metrics_port)
    asyncio.run(
        _operate(
            clusterwide=clusterwide,
            namespaces=() if clusterwide else list(namespaces),
            health_port=health_port,
            standalone=standalone,
            runtime=Runtime(settings, api=api, identity=identity, policy_reports=policy_reports),
        )
    )
    return 0


def _policy_reports(api: client.ApiClient, settings: Settings) -> bool:
    """Whether to keep openreports Reports: on unless turned off, and only where the API server serves them
    (installing the CRDs later takes a restart of the operator). Logged either way."""
    if not settings.policy_reports:
        log.info("policy reports off", reason="turned off (--no-policy-reports or PGWARDEN_POLICY_REPORTS=0)")
        return False
    if not reports_served(api, settings.api_timeout):
        log.info("policy reports off", reason=f"the {REPORTS_API_VERSION} reports CRD is not installed")
        return False
    log.info("policy reports on", api=REPORTS_API_VERSION, kind=REPORT_KIND)
    return True


async def _operate(
    *, clusterwide: bool, namespaces: Sequence[str], health_port: int, standalone: bool, runtime: Runtime
) -> None:
    loop_errors.install(asyncio.get_running_loop())
    watch: asyncio.Task[None] | None = None
    if not standalone:
        assert runtime.api is not None
        assert runtime.identity is not None
        runtime.gate = ActivationGate(runtime.settings.peering_settle)
        scope = None if clusterwide else list(namespaces)
        watch = asyncio.create_task(watch_own_record(runtime.api, PEERING_NAME, scope, runtime.identity, runtime.gate))
    try:
        await _kopf(
            clusterwide=clusterwide,
            namespaces=namespaces,
            health_port=health_port,
            standalone=standalone,
            runtime=runtime,
        )
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)


async def _kopf(
    *, clusterwide: bool, namespaces: Sequence[str], health_port: int, standalone: bool, runtime: Runtime
) -> None:
    await kopf.operator(
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        memo=kopf.Memo(runtime=runtime),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        # Never kopf's auto-detection (standalone whenever the peering CRD is absent): either standalone by
        # choice, or peering made mandatory by naming the object (kopf then pauses until it has seen it).
        standalone=standalone,
        peering_name=None if standalone else PEERING_NAME,
        # kopf's default identity looks the uid up in passwd (controller/identity.py); its Identity type is
        # a NewType of str that kopf does not export.
        identity=runtime.identity,  # type: ignore[arg-type]
    )
