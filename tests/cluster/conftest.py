"""Fixtures of the real-node tier: the cluster, the images in its containerd, pgwarden installed.

The cluster is the one `make cluster` started if it is running (tests then leave it up), else one this
session starts and takes down again, failing if `down` finds anything left on the host.
"""

from __future__ import annotations

import fcntl
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import cluster
from tests.harness.paths import cache_root
from tests.harness.postgres import wait_for

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "manifests" / "overlays" / "local"
SYSTEM_NAMESPACE = "pgwarden-system"
IMAGES = {
    "localhost/pgwarden:dev": "pgwarden",
    "localhost/postgres:15": "postgres",
    "localhost/postgres:18": "postgres18",
}
INSTALL_TIMEOUT = 240.0  # both replicas Ready: image already local, probes every 10 s


def kubectl(
    *args: str, check: bool = True, timeout: float = 120, input_yaml: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl with the cluster's admin kubeconfig; fails with kubectl's stderr in the message."""
    done = cluster.kubectl(*args, check=False, timeout=timeout, stdin=input_yaml)
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def kubectl_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def wait_for_image_builds() -> None:
    """Block while hack/image-build.sh runs (it holds this lock): `make test` builds the images in the
    background, and a cluster brought up meanwhile would import an archive that is about to be replaced."""
    lock = cache_root() / "images" / ".build.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[None]:
    wait_for_image_builds()
    if cluster.running():
        yield
        return
    assert cluster.up() == 0
    try:
        yield
    finally:
        assert cluster.down() == 0, "cluster down left something behind (see its log above)"


@pytest.fixture(scope="session")
def images(real_cluster: None) -> None:
    """The images the tests run, built (make image) and loaded into the node's containerd if missing."""
    present = set(cluster.ctr("images", "ls", "-q").stdout.split())
    missing = sorted({target for image, target in IMAGES.items() if image not in present})
    if missing:
        subprocess.run(["bash", str(REPO / "hack" / "image-build.sh"), *missing], check=True)
    present = set(cluster.ctr("images", "ls", "-q").stdout.split())
    assert set(IMAGES) <= present


def deployment_available(replicas: int) -> bool:
    status = kubectl_json("get", "deployment", "pgwarden", "-n", SYSTEM_NAMESPACE).get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    return (
        conditions.get("Available") == "True"
        and status.get("readyReplicas") == replicas
        and status.get("availableReplicas") == replicas
        and status.get("updatedReplicas") == replicas
    )


@pytest.fixture(scope="session")
def installed(images: None) -> Iterator[subprocess.CompletedProcess[str]]:
    """`kubectl apply -k manifests/overlays/local`, as the README says; at the end deleted again and
    waited for, so a re-run on the same cluster starts clean."""
    applied = kubectl("apply", "-k", str(OVERLAY), check=False)
    yield applied
    kubectl("delete", "-k", str(OVERLAY), "--ignore-not-found", "--wait=true", "--timeout=180s", timeout=240)


@pytest.fixture(scope="session")
def pgwarden_running(installed: subprocess.CompletedProcess[str]) -> None:
    assert installed.returncode == 0, installed.stderr
    wait_for(
        lambda: deployment_available(2), timeout=INSTALL_TIMEOUT, interval=1, message="2 pgwarden replicas Available"
    )


@pytest.fixture
def namespace(pgwarden_running: None) -> Iterator[str]:
    name = f"reap-{secrets.token_hex(4)}"
    kubectl("create", "namespace", name)
    yield name
    # Policies first: the operator removes their finalizers; then the namespace, without waiting.
    kubectl("delete", "postgrespolicies", "--all", "-n", name, "--wait=true", "--timeout=60s")
    kubectl("delete", "namespace", name, "--wait=false")
