"""Every kopf decorator of the central controller, each delegating to a small module.

Importing this module registers the handlers; `pgwarden run` (operator.py) then starts kopf.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import kopf
import structlog

from pgwarden.controller.constants import PEERING_NAME
from pgwarden.controller.runtime import Runtime
from pgwarden.enforcement.events import PolicyEvent
from pgwarden.enforcement.kube import load_api_client
from pgwarden.enforcement.report_queue import ReportQueue
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate
from pgwarden.enforcement.status_queue import StatusQueue
from pgwarden.enforcement.targets import PodInfo, pod_info_from
from pgwarden.enforcement.worker import PolicyWorker, StatusSink, needs_release, wait_for_work
from pgwarden.policy import PolicyError, parse_spec
from pgwarden.policy.api import FINALIZER, GROUP, PLURAL, VERSION, EnforcerKind

log = structlog.get_logger("pgwarden.controller")


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Settings first, then the long-lived clients every handler shares (kept in memo)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled")
    # Silent watch stalls are kopf's most reported failure: bound every watch request.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 10
    settings.posting.loggers = False  # only our explicit, per-cycle aggregated kopf.event() calls post Events
    settings.posting.reporting_component = "pgwarden"
    settings.posting.event_name_prefix = "pgwarden-"
    # Resources are resolved once at start-up; no cluster-wide watch of CRDs and namespaces, so the
    # ClusterRole needs neither (the CRD is installed before the operator, as kustomize orders it).
    settings.scanning.disabled = True
    # HA: replicas peer through the "pgwarden" peering object, and the lower priority pauses. run_controller
    # made sure the object exists before kopf started (kubectl cannot create a CRD and an object of it in one
    # apply, so the operator creates it), or refused to start.
    settings.peering.name = PEERING_NAME
    settings.peering.priority = random.randint(1, 2**31 - 1)  # noqa: S311 - tie-breaking, not security
    runtime: Runtime = memo["runtime"]
    api = runtime.api if runtime.api is not None else load_api_client()
    runtime.bind_clients(api)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    await runtime.close()


@kopf.index("pods")  # type: ignore[arg-type]
def pods_by_namespace(name: str, namespace: str, meta: kopf.Meta, status: kopf.Status, **_: Any) -> dict[str, PodInfo]:
    """Pods by namespace, reduced to what targeting needs: no API list per cycle."""
    return {namespace: pod_info_from(name, namespace, dict(meta), dict(status))}


# Index kwargs (pods_by_namespace) are injected by name, beyond kopf's typed callback protocols.
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=15.0, id="enforce")  # type: ignore[arg-type]
async def enforce(
    stopped: kopf.DaemonStopped,
    name: str,
    namespace: str,
    body: kopf.Body,
    memo: kopf.Memo,
    pods_by_namespace: kopf.Index[str, PodInfo],
    **_: Any,
) -> None:
    """The policy's loop: lives as long as the policy does (stopped at once when it is deleted, or when the
    replica pauses for a peer). In a peered replica its first action waits at the activation gate."""
    runtime: Runtime = memo["runtime"]
    gate = runtime.gate
    if gate is not None and not await gate.wait(gate.clock(), stopped.wait()):
        log.info("paused before acting", policy=name, namespace=namespace)
        return
    status = StatusQueue(
        runtime.writer, namespace, name, EnforcerKind.CONTROLLER, latest=lambda: dict(body), settings=runtime.settings
    )
    reports = (
        ReportQueue(runtime.reports, namespace, name, latest=lambda: dict(body), settings=runtime.settings)
        if runtime.reports is not None
        else None
    )

    def post_event(event: PolicyEvent) -> None:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    worker = PolicyWorker(
        namespace=namespace,
        name=name,
        secrets=runtime.secrets,
        make_enforcer=runtime.make_enforcer,
        write_status=status.submit if reports is None else _both(status.submit, reports.submit),
        post_event=post_event,
        concurrency=runtime.concurrency,
        check_pod=runtime.check_pod,
        settings=runtime.settings,
    )
    failures = 0
    try:
        while not stopped:
            try:
                delay = await worker.step(body, list(pods_by_namespace.get(namespace, [])))
                failures = 0
            except Exception as exc:  # no exception but cancellation ends a policy's loop (kopf would back off 60 s)
                failures += 1
                delay = runtime.settings.retry_delay(failures, runtime.settings.max_backoff)
                log.warning(
                    "policy step failed; retrying",
                    policy=name,
                    namespace=namespace,
                    retry_in=delay,
                    error=f"{type(exc).__name__}: {str(exc)[:300]}",
                )
            runtime.tick(namespace, name)
            await wait_for_work(delay, worker.inflight(), stopped.wait())
    finally:
        runtime.loops.pop((namespace, name), None)
        deleted = stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason
        flush = runtime.settings.api_timeout if not stopped else None
        # One shielded wind-down: kopf cancels a deleted policy's daemon right after asking it to stop, and a
        # cancellation landing between separately shielded steps skipped the rest (writer tasks left running).
        await asyncio.shield(_wind_down(runtime, worker, status, reports, flush, deleted))


async def _wind_down(
    runtime: Runtime,
    worker: PolicyWorker,
    status: StatusQueue,
    reports: ReportQueue | None,
    flush: float | None,
    deleted: bool,
) -> None:
    """Let go of the targets, stop the status writer (after a last write if `flush`), and stop the Report
    writer: a deleted policy's Report goes with it (the owner reference covers clusters with a garbage
    collector); paused for a peer or exiting, it stays, and the replica that goes on keeps it."""
    await worker.close()
    await status.close(flush_within=flush)
    runtime.writer.forget(status.namespace, status.name)
    if reports is not None:
        await (reports.delete() if deleted else reports.close())


def _both(status: StatusSink, reports: StatusSink) -> StatusSink:
    """One sink feeding the status and the Report: the Report first (it only folds the step into memory), so
    the status's own bounded wait (the autovacuum write-ahead) is unchanged."""

    async def sink(
        updates: list[TargetUpdate], owned: list[str], condition: PolicyCondition | None, must: bool
    ) -> None:
        await reports(updates, owned, condition, must)
        await status(updates, owned, condition, must)

    return sink


@kopf.on.probe(id="enforcement")
def enforcement_health(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    """/healthz fails when a policy's loop has stopped completing steps (a bug, not a slow database: every
    evaluation and API call is bounded); then the kubelet restarts the replica. A slow or failing target or
    API server is in status and metrics, not here: restarting would not fix it."""
    runtime: Runtime = memo["runtime"]
    stalled = runtime.stalled_loops()
    if stalled:
        raise kopf.PermanentError(f"policy loops stalled: {', '.join(stalled[:20])}")
    return {"policies": len(runtime.loops)}


def writes_on_targets(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """The release handler runs only for policies whose deletion has something to undo (see needs_release).

    (Every policy still carries kopf's finalizer: its daemons always ask for one.)"""
    try:
        parse_spec(dict(spec))  # an invalid spec has no handler to run it
        return needs_release(dict(status))
    except PolicyError:
        return False


@kopf.on.delete(GROUP, VERSION, PLURAL, id="release", when=writes_on_targets)  # type: ignore[arg-type]
async def release(
    name: str,
    namespace: str,
    spec: kopf.Spec,
    status: kopf.Status,
    body: kopf.Body,
    memo: kopf.Memo,
    pods_by_namespace: kopf.Index[str, PodInfo],
    **_: Any,
) -> None:
    """Undo what status records pgwarden wrote (autovacuum_max_workers) on the targets; never blocks deletion
    for long or on a gone target, and names what it leaves behind in a Warning Event."""
    runtime: Runtime = memo["runtime"]
    try:
        parsed = parse_spec(dict(spec))
    except PolicyError:
        return
    worker = PolicyWorker(
        namespace=namespace,
        name=name,
        secrets=runtime.secrets,
        make_enforcer=runtime.make_enforcer,
        write_status=_no_status,
        post_event=lambda event: kopf.event(body, type=event.type, reason=event.reason, message=event.message),
        concurrency=runtime.concurrency,
        settings=runtime.settings,
    )
    timeout = runtime.settings.release_timeout
    try:
        await asyncio.wait_for(
            worker.release(parsed, list(pods_by_namespace.get(namespace, [])), timeout, dict(status)),
            timeout + 5,  # each target is bounded by `timeout`; this bounds the whole, gathering included
        )
    except Exception as exc:  # a gone or broken target never blocks deletion
        log.warning("release incomplete; deleting anyway", policy=name, namespace=namespace, error=str(exc))


async def _no_status(*_args: Any) -> None:
    return None
