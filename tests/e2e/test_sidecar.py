"""Sidecar mode for real: one `pgwarden sidecar` process per fake pod, as its ServiceAccount under RBAC.

Proves: each sidecar enforces on its own server only; the controller running at the same time
skips annotated pods; three sidecars writing one policy's status at once lose no entry; removing the
annotation hands the pod to the controller; the sidecar needs no access to Secrets.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from pgwarden.policy.api import EventReason
from tests.fixtures.operator import OperatorFactory, SidecarProcess
from tests.fixtures.postgres import PgFactory
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import create_running_pod
from tests.harness.policies import (
    PASSWORD,
    create_policy,
    create_secret,
    events,
    get_policy,
    next_host,
    open_app_sessions,
    policy_body,
    prepare_server,
)
from tests.harness.postgres import PgServer, free_port, holds_for, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

REPO = Path(__file__).resolve().parents[2]
SIDECAR = {"pgwarden.dev/enforcer": "sidecar"}


def sidecar_identity(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Path:
    """Apply manifests/sidecar into the namespace and return a kubeconfig for its ServiceAccount."""
    control_plane.kubectl("apply", "-k", str(REPO / "manifests" / "sidecar"), "-n", namespace)
    token = control_plane.token_for(namespace, "pgwarden-sidecar")
    return control_plane.kubeconfig_for_token(token, tmp_path / "sidecar.kubeconfig")


def can_i(api: client.ApiClient, namespace: str, verb: str, resource: str) -> bool:
    attributes = client.V1ResourceAttributes(namespace=namespace, verb=verb, resource=resource)
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes))
    )
    return review.status is not None and bool(review.status.allowed)


def sidecar_targets(api: client.ApiClient, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    status = get_policy(api, namespace, name).get("status") or {}
    return {t["pod"]: t for t in status.get("targets") or []}


# Handover waits (15 s to a sidecar, 90 s back to the controller) shortened: tests/e2e/test_handover.py
# proves the waits themselves; here the sharing of status and the direction of the handover are the point.
QUICK_HANDOVER = {"PGWARDEN_HANDOVER_GRACE": "3", "PGWARDEN_SIDECAR_RELEASE_GRACE": "3"}


def test_sidecars_enforce_own_server_share_status_and_hand_over_to_controller(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    pg_factory: PgFactory,
    run_operator: OperatorFactory,
    run_sidecar: Any,
    tmp_path: Path,
) -> None:
    first = pg_factory(host=next_host(), hba="password")
    servers: list[PgServer] = [first] + [
        pg_factory(host=next_host(), port=first.port, hba="password") for _ in range(2)
    ]
    for server in servers:
        prepare_server(server)
    kubeconfig = sidecar_identity(control_plane, namespace, tmp_path)
    with control_plane.api_client(token=control_plane.token_for(namespace, "pgwarden-sidecar")) as sidecar_api:
        assert not can_i(sidecar_api, namespace, "get", "secrets")
        assert can_i(sidecar_api, namespace, "get", "pods")
    create_secret(k8s_api, namespace)
    pods = [f"db-{i}" for i in range(3)]
    for pod, server in zip(pods, servers, strict=True):
        create_running_pod(k8s_api, namespace, pod, {"app": "pg"}, server.host, annotations=SIDECAR)
    run_operator([namespace], env=QUICK_HANDOVER)
    create_policy(k8s_api, namespace, policy_body("reaper", first.port))
    sessions = {pod: open_app_sessions(server, 2) for pod, server in zip(pods, servers, strict=True)}
    # Nobody enforces yet: the pods are annotated for sidecars and no sidecar runs. Bounded look.
    everyone_alive = lambda: all(s.alive(pid) for pod, s in zip(pods, servers, strict=True) for pid in sessions[pod])  # noqa: E731
    assert holds_for(everyone_alive, 6), "the controller must skip pods annotated for a sidecar"

    for pod, server in zip(pods, servers, strict=True):
        run_sidecar(kubeconfig, namespace, pod, server.dsn("warden", password=PASSWORD), env=QUICK_HANDOVER)
    for pod, server in zip(pods, servers, strict=True):
        for pid in sessions[pod]:
            server.wait_gone(pid, timeout=30)

    def all_three_reported() -> dict[str, dict[str, Any]] | None:
        targets = sidecar_targets(k8s_api, namespace, "reaper")
        ok = set(targets) == set(pods) and all(
            t.get("enforcer") == "sidecar" and t.get("lastActions") for t in targets.values()
        )
        return targets if ok else None

    wait_for(all_three_reported, timeout=30, message="three sidecar entries in status.targets")
    totals = get_policy(k8s_api, namespace, "reaper")["status"]["totals"]
    assert totals["terminated"] == 6
    sources = {
        e.source.component for e in events(k8s_api, namespace, "reaper") if e.reason == EventReason.SESSIONS_TERMINATED
    }
    assert sources == {"pgwarden-sidecar"}

    # Hand db-0 back to the controller: the sidecar goes idle, the controller takes over.
    client.CoreV1Api(k8s_api).patch_namespaced_pod(
        "db-0", namespace, {"metadata": {"annotations": {"pgwarden.dev/enforcer": None}}}
    )
    later = open_app_sessions(servers[0], 2)
    for pid in later:
        servers[0].wait_gone(pid, timeout=30)
    wait_for(
        lambda: sidecar_targets(k8s_api, namespace, "reaper").get("db-0", {}).get("enforcer") == "controller",
        timeout=30,
        message="db-0 reported by the controller",
    )
    targets = sidecar_targets(k8s_api, namespace, "reaper")
    assert targets["db-1"]["enforcer"] == targets["db-2"]["enforcer"] == "sidecar"


def _health(sidecar: SidecarProcess) -> dict[str, Any] | None:
    """The sidecar's /healthz body when it answers 200, else None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.health_port}/healthz", timeout=2) as resp:
            return dict(json.loads(resp.read())) if resp.status == 200 else None
    except OSError:
        return None


def test_a_sidecar_never_fails_its_probe_for_the_api_servers_sake(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    pg: PgServer,
    run_sidecar: Callable[..., SidecarProcess],
    tmp_path: Path,
) -> None:
    """Its RoleBinding missing, or the API server unreachable: /healthz stays 200 (the kubelet must neither
    restart the sidecar nor take the PostgreSQL pod out of service for it), and the body says what is wrong."""
    no_role = control_plane.kubeconfig_for_token(control_plane.token_for(namespace, "no-role"), tmp_path / "nr.kc")
    unreachable = control_plane.kubeconfig_for_token("nobody", tmp_path / "down.kc")
    down = yaml.safe_load(unreachable.read_text())
    down["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable.write_text(yaml.safe_dump(down))
    forbidden = run_sidecar(no_role, namespace, "db-0", pg.dsn())
    offline = run_sidecar(unreachable, namespace, "db-1", pg.dsn())
    for sidecar, says in ((forbidden, "403"), (offline, "")):

        def reported(sidecar: SidecarProcess = sidecar) -> dict[str, Any] | None:
            body = _health(sidecar)
            return body if body is not None and body["lastError"] else None

        def answering(sidecar: SidecarProcess = sidecar) -> bool:
            return _health(sidecar) is not None

        body = wait_for(reported, timeout=30, message="the sidecar to report its API failure on a 200 /healthz")
        assert body["loop"] is True
        assert body["apiReachable"] is False
        assert says in body["lastError"]
        assert holds_for(answering, 12)  # two polls at least


def test_a_sidecar_with_two_policies_holds_one_connection_to_its_server(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    pg_factory: PgFactory,
    run_sidecar: Any,
    tmp_path: Path,
) -> None:
    """Both policies enforce through one engine connection (counted in pg_stat_activity), which stays the same
    backend while both keep cycling: no second connection for an idle rule to reap."""
    server = pg_factory(host=next_host(), hba="password")
    prepare_server(server)
    kubeconfig = sidecar_identity(control_plane, namespace, tmp_path)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host, annotations=SIDECAR)
    for name in ("reaper", "sweeper"):
        create_policy(k8s_api, namespace, policy_body(name, server.port, interval="1s"))
    sessions = open_app_sessions(server, 2)
    run_sidecar(kubeconfig, namespace, "db-0", server.dsn("warden", password=PASSWORD))
    for pid in sessions:
        server.wait_gone(pid, timeout=30)

    def engine_backends() -> set[int]:
        rows = server.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND application_name LIKE %s", ("warden", "pgwarden%")
        )
        return {pid for (pid,) in rows}

    def both_reported() -> bool:
        return all(
            sidecar_targets(k8s_api, namespace, name).get("db-0", {}).get("serverVersion")
            for name in ("reaper", "sweeper")
        )

    wait_for(both_reported, timeout=30, message="both policies evaluated by the sidecar")
    (backend,) = wait_for(engine_backends, timeout=10, message="the sidecar's engine connection")
    assert holds_for(lambda: engine_backends() == {backend}, 6), "one engine connection for both policies"
