"""`helm install` of manifests/helm/pgwarden on the real node, as the README installs it, and `helm uninstall`.

The chart's names are fixed (ClusterRole, ClusterRoleBinding and ClusterKopfPeering `pgwarden`, the same as
`kubectl apply -k manifests/`: one install per cluster), so the release cannot live beside the kustomize
install the other modules of this tier share. This module's fixture takes that install down first (waiting
until it is gone), installs the chart, and afterwards puts the kustomize install back as it found it, with
its replicas Available again, so the tests after this module find what they expect.

Values: only the image (localhost/pgwarden:dev, pullPolicy Never: no registry on this machine).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import psycopg
import pytest

from tests.cluster.conftest import (
    INSTALL_TIMEOUT,
    OVERLAY,
    SYSTEM_NAMESPACE,
    deployment_available,
    kubectl,
    kubectl_json,
)
from tests.cluster.postgres_pod import (
    APP_PASSWORD,
    REAP_TIMEOUT,
    alive,
    apply,
    credentials_secret,
    fast_idle_reaper,
    open_idle,
    pids,
    policy_totals,
    start_postgres,
)
from tests.harness import cluster
from tests.harness.helm import CHART, RELEASE, Key, by_key, helm, render, values_file
from tests.harness.manifests import CRD_NAMES, MANIFESTS
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.cluster

VALUES = {"image": {"repository": "localhost/pgwarden", "tag": "dev", "pullPolicy": "Never"}}
# The plural resource kubectl takes for each kind the chart renders.
RESOURCE = {
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles.rbac.authorization.k8s.io",
    "ClusterRoleBinding": "clusterrolebindings.rbac.authorization.k8s.io",
    "Deployment": "deployments.apps",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets.policy",
    "NetworkPolicy": "networkpolicies.networking.k8s.io",
}


def exists(object_key: Key) -> bool:
    kind, name, namespace = object_key
    args = ["get", f"{RESOURCE[kind]}/{name}", "--ignore-not-found", "-o", "name"]
    if namespace:
        args += ["-n", namespace]
    return bool(kubectl(*args).stdout.strip())


def gone(object_key: Key) -> bool:
    return not exists(object_key)


def uninstall(*, check: bool = True) -> None:
    helm("uninstall", RELEASE, "--namespace", SYSTEM_NAMESPACE, "--wait", kubeconfig=cluster.KUBECONFIG, check=check)


def kustomize_installed() -> bool:
    """Whether the kustomize install is on the cluster (its Deployment, without Helm's release label)."""
    found = kubectl("get", "deployment", "pgwarden", "-n", SYSTEM_NAMESPACE, "--ignore-not-found", "-o", "json")
    if not found.stdout.strip():
        return False
    labels = kubectl_json("get", "deployment", "pgwarden", "-n", SYSTEM_NAMESPACE)["metadata"].get("labels", {})
    return bool(labels.get("app.kubernetes.io/managed-by") != "Helm")


def remove_kustomize_install() -> None:
    kubectl("delete", "-k", str(OVERLAY), "--ignore-not-found", "--wait=true", "--timeout=180s", timeout=240)


def restore_kustomize_install() -> None:
    kubectl("apply", "-k", str(OVERLAY))
    wait_for(lambda: deployment_available(2), timeout=INSTALL_TIMEOUT, interval=1, message="kustomize install back")


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Key, dict[str, object]]]:
    """The values file and the objects `helm template` renders with it."""
    path = values_file(VALUES, tmp_path_factory.mktemp("helm"))
    return path, dict(by_key(render("-f", str(path))))


@pytest.fixture(scope="module")
def released(images: None, expected: tuple[Path, dict[Key, dict[str, object]]]) -> Iterator[Path]:
    """The chart installed as the README says (namespace.yaml first), in place of the kustomize install."""
    had_kustomize = kustomize_installed()
    if had_kustomize:
        remove_kustomize_install()
    path, _ = expected
    kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    done = helm(
        "install", RELEASE, str(CHART), "--namespace", SYSTEM_NAMESPACE, "-f", str(path),
        kubeconfig=cluster.KUBECONFIG, check=False,
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        yield path
    finally:
        # Idempotent: the uninstall test did it already unless it failed before.
        helm(
            "uninstall", RELEASE, "--namespace", SYSTEM_NAMESPACE, "--wait", kubeconfig=cluster.KUBECONFIG, check=False
        )
        if had_kustomize:
            restore_kustomize_install()
        else:
            kubectl("delete", "namespace", SYSTEM_NAMESPACE, "--ignore-not-found", "--wait=true", timeout=180)


def test_helm_install_becomes_available_and_reaps(released: Path) -> None:
    """The release's Deployment Available with its 2 replicas on the local image; a policy reaps."""
    wait_for(lambda: deployment_available(2), timeout=INSTALL_TIMEOUT, interval=1, message="2 replicas Available")
    deployment = kubectl_json("get", "deployment", "pgwarden", "-n", SYSTEM_NAMESPACE)
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("localhost/pgwarden:dev", "Never")

    namespace = f"helm-{secrets.token_hex(4)}"
    kubectl("create", "namespace", namespace)
    try:
        host = start_postgres(namespace)
        doomed = open_idle(host, 2)
        busy = psycopg.connect(host=host, user="app", password=APP_PASSWORD, dbname="postgres")
        busy.execute("SELECT 1")  # idle in transaction: the rule leaves it
        try:
            apply(namespace, credentials_secret(namespace), fast_idle_reaper(namespace))
            wait_for(lambda: not alive(host, pids(doomed)), timeout=REAP_TIMEOUT, interval=0.5, message="reaped")
            assert alive(host, [busy.info.backend_pid]) == {busy.info.backend_pid}
            wait_for(
                lambda: policy_totals(namespace).get("terminated") == 2, timeout=60, interval=0.5, message="totals"
            )
        finally:
            busy.close()
            for conn in doomed:
                conn.close()
    finally:
        # Policies first, while the operator runs to release their finalizers (the README's order).
        kubectl("delete", "postgrespolicies", "--all", "-n", namespace, "--wait=true", "--timeout=60s")
        kubectl("delete", "namespace", namespace, "--wait=false")


def test_helm_uninstall_removes_what_it_made_but_the_crds(
    released: Path, expected: tuple[Path, dict[Key, dict[str, object]]]
) -> None:
    _, objects = expected
    kinds = {k[0] for k in objects}
    assert kinds >= {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"}
    for object_key in objects:
        assert exists(object_key), object_key
    uninstall()
    for object_key in objects:
        wait_for(partial(gone, object_key), timeout=60, interval=0.5, message=f"{object_key} deleted")
    # The pods went with the Deployment; Helm leaves crds/ in place (deleting them would delete every policy).
    wait_for(
        lambda: (
            not kubectl_json("get", "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/name=pgwarden")["items"]
        ),
        timeout=120,
        interval=1,
        message="the operator's pods gone",
    )
    for name in CRD_NAMES:
        assert kubectl("get", "crd", name, "-o", "name").stdout.strip()
    assert helm("list", "-n", SYSTEM_NAMESPACE, "-q", kubeconfig=cluster.KUBECONFIG).stdout.strip() == ""
