"""The sidecar example (manifests/sidecar/examples/statefulset.yaml) on the real node, as shipped.

Only the image names change (this machine has no registry: localhost/postgres:18 and
localhost/pgwarden:dev, both with imagePullPolicy Never); the RBAC is manifests/sidecar applied to the
namespace, as the README says. The StatefulSet's volume claim is bound to a hostPath volume made for the
test (a single node has no provisioner). The sidecar reaches PostgreSQL over the shared socket
directory and must reap idle sessions its policy selects, while the central controller skips the pod.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.cluster.conftest import kubectl, kubectl_json
from tests.cluster.postgres_pod import (
    APP_PASSWORD,
    REAP_TIMEOUT,
    ROLE_PASSWORD,
    SUPERUSER_PASSWORD,
    alive,
    apply,
    credentials_secret,
    fast_idle_reaper,
    open_idle,
    pids,
    policy_totals,
)
from tests.harness.cluster import DATA_DIR
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "manifests" / "sidecar" / "examples" / "statefulset.yaml"
SIDECAR_RBAC = REPO / "manifests" / "sidecar"
IMAGES = {"postgres:18.1": "localhost/postgres:18", "localhost/pgwarden:0.1.0": "localhost/pgwarden:dev"}
POSTGRES_UID = 999  # the postgres user of the official image and of localhost/postgres:*
# An address on the pod network that no pod has (host-local IPAM hands out addresses from the bottom of
# 10.88.0.0/16): packets to it go onto the bridge and nothing answers, like an API server behind a partition.
NOBODY = "10.88.255.254"


def example_with_local_images() -> dict[str, Any]:
    statefulset = yaml.safe_load(EXAMPLE.read_text())
    for container in statefulset["spec"]["template"]["spec"]["containers"]:
        container["image"] = IMAGES[container["image"]]
        container["imagePullPolicy"] = "Never"
    return dict(statefulset)


@pytest.fixture
def volume(namespace: str) -> Iterator[dict[str, Any]]:
    """A hostPath PersistentVolume pre-bound to the example's claim (data-orders-db-0), owned by postgres."""
    path = DATA_DIR / "volumes" / namespace
    path.mkdir(parents=True)
    shutil.chown(path, POSTGRES_UID, POSTGRES_UID)
    pv: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-data"},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": "data-orders-db-0"},
        },
    }
    kubectl("apply", "-f", "-", input_yaml=yaml.safe_dump(pv))
    yield pv
    kubectl("delete", "statefulset", "orders-db", "-n", namespace, "--ignore-not-found", "--wait=true")
    kubectl("delete", "pvc", "--all", "-n", namespace, "--wait=false")
    kubectl("delete", "pv", pv["metadata"]["name"], "--wait=false")
    shutil.rmtree(path, ignore_errors=True)


def test_sidecar_example_runs_as_shipped_and_reaps_over_the_socket(namespace: str, volume: dict[str, Any]) -> None:
    kubectl("apply", "-k", str(SIDECAR_RBAC), "-n", namespace)
    secret = credentials_secret(namespace)
    superuser = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "orders-db-superuser", "namespace": namespace},
        "stringData": {"password": SUPERUSER_PASSWORD},
    }
    apply(namespace, superuser, secret, example_with_local_images())

    def pod() -> dict[str, Any] | None:
        found = kubectl("get", "pod", "orders-db-0", "-n", namespace, "-o", "json", check=False)
        return yaml.safe_load(found.stdout) if found.returncode == 0 else None

    def postgres_running() -> str | None:
        current = pod()
        statuses = {s["name"]: s for s in (current or {}).get("status", {}).get("containerStatuses", [])}
        return current["status"].get("podIP") if current and statuses.get("postgres", {}).get("ready") else None

    host = wait_for(postgres_running, timeout=REAP_TIMEOUT, interval=0.5, message="orders-db-0's postgres running")

    def accepting() -> bool:  # the example's postgres has no readiness probe: ready is "started"
        try:
            psycopg.connect(host=host, user="postgres", password=SUPERUSER_PASSWORD, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    wait_for(accepting, timeout=REAP_TIMEOUT, interval=0.5, message="orders-db-0's postgres accepting connections")
    with psycopg.connect(host=host, user="postgres", password=SUPERUSER_PASSWORD, autocommit=True) as conn:
        conn.execute((REPO / "manifests" / "examples" / "pgwarden-role.sql").read_text().encode())
        conn.execute(sql.SQL("ALTER ROLE pgwarden PASSWORD {}").format(sql.Literal(ROLE_PASSWORD)))
        conn.execute(sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(sql.Literal(APP_PASSWORD)))

    def both_ready() -> bool:
        statuses = (pod() or {}).get("status", {}).get("containerStatuses", [])
        return len(statuses) == 2 and all(s["ready"] for s in statuses)

    wait_for(both_ready, timeout=REAP_TIMEOUT, interval=0.5, message="orders-db-0 Ready 2/2")
    doomed = open_idle(host, 1)
    try:
        policy = fast_idle_reaper(namespace)
        policy["spec"]["selector"] = {"matchLabels": {"app": "orders-db"}}
        apply(namespace, policy)
        wait_for(lambda: not alive(host, pids(doomed)), timeout=REAP_TIMEOUT, interval=0.5, message="reaped")
        wait_for(lambda: policy_totals(namespace).get("terminated") == 1, timeout=60, interval=0.5, message="totals")
        # Enforced by the sidecar, over the socket: its own log says so, the central controller skipped it.
        log = kubectl("logs", "orders-db-0", "-c", "pgwarden", "-n", namespace).stdout
        assert '"event": "session terminated"' in log
        statuses = kubectl_json("get", "pod", "orders-db-0", "-n", namespace)["status"]["containerStatuses"]
        assert {s["name"]: s["restartCount"] for s in statuses} == {"postgres": 0, "pgwarden": 0}
    finally:
        for conn in doomed:
            conn.close()


def sidecar_pod(namespace: str) -> dict[str, Any] | None:
    found = kubectl("get", "pod", "orders-db-0", "-n", namespace, "-o", "json", check=False)
    return dict(json.loads(found.stdout)) if found.returncode == 0 else None


def ready_two_of_two(pod: dict[str, Any] | None) -> bool:
    """The pod Ready and both containers ready and running (what `kubectl get` shows as 2/2 Running)."""
    status = (pod or {}).get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    containers = status.get("containerStatuses", [])
    return (
        conditions.get("Ready") == "True"
        and len(containers) == 2
        and all(c["ready"] and "running" in c["state"] for c in containers)
    )


def liveness_window(statefulset: dict[str, Any]) -> float:
    """How long the kubelet needs to restart a sidecar whose /healthz fails from the start: period times
    failureThreshold (Kubernetes' default 3), plus one more period so a restart would have shown."""
    (sidecar,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "pgwarden"]
    probe = sidecar["livenessProbe"]
    period = float(probe.get("periodSeconds", 10))
    return float(probe.get("initialDelaySeconds", 0)) + period * (int(probe.get("failureThreshold", 3)) + 1)


def healthz(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar's own /healthz body, from the host on the pod's address (None until it listens: the
    container is "running" from its first instruction, the health server a few seconds of imports later)."""
    try:
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/healthz", timeout=5) as response:
            return dict(json.loads(response.read()))
    except ConnectionRefusedError:
        return None
    except urllib.error.URLError as error:
        if isinstance(error.reason, ConnectionRefusedError):
            return None
        raise


@pytest.mark.parametrize("fault", ["no-rolebinding", "api-unreachable"])
def test_sidecar_keeps_its_pod_ready_when_it_cannot_use_the_api(
    namespace: str, volume: dict[str, Any], fault: str
) -> None:
    """A sidecar that cannot use the API server (its RoleBinding missing, or the server unreachable) must
    not take its database out of service: the pod stays 2/2 Ready and the sidecar is never restarted, over
    longer than liveness needs to restart it; its /healthz says what is wrong, with status 200."""
    statefulset = example_with_local_images()
    if fault == "no-rolebinding":
        # Only the ServiceAccount the pod runs as: manifests/sidecar's Role and RoleBinding not applied.
        kubectl("apply", "-n", namespace, "-f", str(SIDECAR_RBAC / "serviceaccount.yaml"))
    else:
        # The RBAC applied; the sidecar's in-cluster configuration points at an address nothing answers on
        # (KUBERNETES_SERVICE_HOST from the pod spec wins over the kubelet's Service variables).
        kubectl("apply", "-k", str(SIDECAR_RBAC), "-n", namespace)
        (sidecar,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "pgwarden"]
        sidecar["env"].append({"name": "KUBERNETES_SERVICE_HOST", "value": NOBODY})
    superuser = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "orders-db-superuser", "namespace": namespace},
        "stringData": {"password": SUPERUSER_PASSWORD},
    }
    apply(namespace, superuser, credentials_secret(namespace), statefulset)

    pod = wait_for(
        lambda: (lambda p: p if ready_two_of_two(p) else None)(sidecar_pod(namespace)),
        timeout=REAP_TIMEOUT,
        interval=0.5,
        message="orders-db-0 Ready 2/2",
    )
    # The fault is real: the sidecar has tried the API server and failed, and says so.
    # Forbidden without the RoleBinding; when unreachable, a connection that never got an HTTP answer: the
    # loop's own read reports urllib3's MaxRetryError, a status write the message naming the address.
    expected = ("403",) if fault == "no-rolebinding" else ("MaxRetryError", NOBODY)
    body = wait_for(
        lambda: (lambda b: b if b and not b["apiReachable"] and b["lastError"] else None)(healthz(pod)),
        timeout=60,
        interval=1,
        message="the sidecar reporting the API unusable",
    )
    assert body["loop"] is True
    assert any(text in body["lastError"] for text in expected), body
    if fault == "api-unreachable":
        assert "403" not in body["lastError"], body

    # Watched, not slept through: every second until past the time liveness would have restarted it.
    deadline = time.monotonic() + liveness_window(statefulset)

    def held_until_deadline() -> bool:
        current = sidecar_pod(namespace)
        assert current is not None
        assert ready_two_of_two(current), current["status"]
        restarts = {c["name"]: c["restartCount"] for c in current["status"]["containerStatuses"]}
        assert restarts == {"postgres": 0, "pgwarden": 0}
        return time.monotonic() >= deadline

    wait_for(held_until_deadline, timeout=liveness_window(statefulset) + 30, interval=1, message="the window")
    final = healthz(pod)
    assert final is not None
    assert final["apiReachable"] is False
    assert final["loop"] is True
