"""`pgwarden run`: start the central controller (kopf) with metrics and health endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import kopf

from pgwarden.controller import loop_errors
from pgwarden.controller.identity import peering_identity
from pgwarden.controller.runtime import Runtime
from pgwarden.enforcement import metrics
from pgwarden.settings import DEFAULTS, Settings


def run_controller(
    namespaces: Sequence[str],
    all_namespaces: bool,
    metrics_port: int,
    health_port: int,
    standalone: bool = False,
    settings: Settings = DEFAULTS,
) -> int:
    """Run until SIGINT/SIGTERM. Without namespaces and without --all-namespaces, watch all namespaces."""
    from pgwarden.controller import handlers  # noqa: F401 - importing registers the handlers

    metrics.serve(metrics_port)
    clusterwide = all_namespaces or not namespaces
    asyncio.run(
        _operate(
            clusterwide=clusterwide,
            namespaces=() if clusterwide else list(namespaces),
            health_port=health_port,
            standalone=standalone,
            settings=settings,
        )
    )
    return 0


async def _operate(
    *, clusterwide: bool, namespaces: Sequence[str], health_port: int, standalone: bool, settings: Settings
) -> None:
    loop_errors.install(asyncio.get_running_loop())
    await kopf.operator(
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        memo=kopf.Memo(runtime=Runtime(settings)),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        standalone=True if standalone else None,  # None: peer when a peering object exists
        # kopf's default identity looks the uid up in passwd (controller/identity.py); its Identity type is
        # a NewType of str that kopf does not export.
        identity=peering_identity(),  # type: ignore[arg-type]
    )
