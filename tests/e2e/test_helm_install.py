"""`helm install` of manifests/helm/pgwarden on a real kube-apiserver, and `helm uninstall`.

The control plane is this module's own: the chart's cluster-scoped objects (ClusterRole `pgwarden`, ...)
have the names `kubectl apply -k manifests/` gives them, and Helm refuses to take over objects it did not
create, so the session's shared plane (where other tests apply manifests/) would make the install fail.
There is no kubelet: the Deployment's pods never run, which is not what is tested here.

With `watchNamespaces` the operator is also run for real (as a subprocess, with the rendered Deployment's
arguments and the chart's ServiceAccount token) against a real PostgreSQL server: the namespaced Roles the
chart renders must be all it needs (tests/e2e/test_rbac.py proves the same for the ClusterRole).

Helm's convention for `crds/`: installed when missing, never upgraded, never deleted (deleting a CRD
deletes every PostgresPolicy). The uninstall test asserts that the CRDs stay.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client

from pgwarden.policy.api import ConditionType, EventReason
from tests.fixtures.operator import OperatorProcess, crd_established
from tests.harness.controlplane import ControlPlane
from tests.harness.helm import CHART, RELEASE, Key, by_key, helm, render, values_file
from tests.harness.k8s import as_dict, create_running_pod, new_namespace
from tests.harness.manifests import (
    CRD_NAMES,
    MANIFESTS,
    SYSTEM_NAMESPACE,
    apply_documents,
    example_secret,
    fast_idle_reaper,
    open_session_mix,
    policies_served,
    prepare_example_server,
)
from tests.harness.pgbinaries import e2e_versions
from tests.harness.policies import condition, events, get_policy, next_host, terminated_total
from tests.harness.postgres import running_server, wait_for

pytestmark = pytest.mark.k8s

# The README's CRD upgrade: Helm created the CRDs (an update by manager "helm"), so a server-side apply must
# take the fields over (--force-conflicts) to change them.
CRD_UPGRADE = ("apply", "--server-side", "--force-conflicts", "-f")
NEXT = "PostgresPolicy, as a next chart version describes it"
SERVICE_ACCOUNT = f"system:serviceaccount:{SYSTEM_NAMESPACE}:pgwarden"
# RBAC does not depend on the PostgreSQL version: one server of the newest selected major (as test_rbac.py).
PG_MAJOR = max(e2e_versions(), key=int)
# The plural resource kubectl takes for each kind the chart renders.
RESOURCE = {
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles.rbac.authorization.k8s.io",
    "ClusterRoleBinding": "clusterrolebindings.rbac.authorization.k8s.io",
    "Role": "roles.rbac.authorization.k8s.io",
    "RoleBinding": "rolebindings.rbac.authorization.k8s.io",
    "Deployment": "deployments.apps",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets.policy",
    "NetworkPolicy": "networkpolicies.networking.k8s.io",
    "CustomResourceDefinition": "customresourcedefinitions.apiextensions.k8s.io",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    """A control plane of this module's own (see the module docstring)."""
    with ControlPlane() as plane:
        yield plane


@pytest.fixture(scope="module")
def admin(cluster: ControlPlane) -> Iterator[client.ApiClient]:
    with cluster.api_client() as api:
        yield api


def exists(plane: ControlPlane, object_key: Key) -> bool:
    """Whether the object is on the server now (`kubectl get --ignore-not-found` prints nothing when not)."""
    kind, name, namespace = object_key
    args = ["get", f"{RESOURCE[kind]}/{name}", "--ignore-not-found", "-o", "name"]
    if namespace:
        args += ["-n", namespace]
    return bool(plane.kubectl(*args).stdout.strip())


def gone(plane: ControlPlane, object_key: Key) -> bool:
    return not exists(plane, object_key)


def install(plane: ControlPlane, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """As the README installs: manifests/namespace.yaml first (its Pod Security labels), then the chart into it."""
    plane.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    return helm(
        "install", RELEASE, str(CHART), "--namespace", SYSTEM_NAMESPACE, *extra,
        kubeconfig=plane.kubeconfig, check=check,
    )  # fmt: skip


def uninstall(plane: ControlPlane) -> None:
    helm("uninstall", RELEASE, "--namespace", SYSTEM_NAMESPACE, kubeconfig=plane.kubeconfig)


def releases(plane: ControlPlane) -> str:
    return str(helm("list", "--all-namespaces", "--all", "-q", kubeconfig=plane.kubeconfig).stdout.strip())


def crd_description(api: client.ApiClient) -> str | None:
    """The description of the PostgresPolicy CRD's first version's schema, as stored."""
    crd = as_dict(client.ApiextensionsV1Api(api).read_custom_resource_definition(CRD_NAMES[0]))
    description = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].get("description")
    return None if description is None else str(description)


def can_i(plane: ControlPlane, verb: str, resource: str, namespace: str) -> bool:
    """`kubectl auth can-i` as the operator's ServiceAccount (impersonated by the admin)."""
    done = plane.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={SERVICE_ACCOUNT}", check=False)
    return done.stdout.strip() == "yes"


def test_hostile_values_fail_the_install_before_anything_is_created(cluster: ControlPlane, tmp_path: Path) -> None:
    """The schema refuses the values at `helm install`: no release and none of the chart's objects.

    Except the CRDs: Helm 3 installs crds/ before it renders (and so validates) the values. That is
    harmless (they are what any install creates, and stay after an uninstall anyway) and asserted here so
    that a Helm upgrade changing it is noticed.
    """
    done = install(cluster, "-f", str(values_file({"replicas": -1, "image": {"tag": "a b"}}, tmp_path)), check=False)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
    assert releases(cluster) == ""
    for object_key in by_key(render()):
        assert not exists(cluster, object_key), object_key
    for name in CRD_NAMES:
        assert exists(cluster, ("CustomResourceDefinition", name, "")), name


def test_install_creates_every_object_and_uninstall_removes_them_but_the_crds(
    cluster: ControlPlane, admin: client.ApiClient
) -> None:
    """Default values: what `helm template` renders is on the server, CRDs Established; uninstall: all gone
    but the CRDs, which Helm never deletes."""
    expected = by_key(render())
    assert {k[0] for k in expected} >= {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"}
    notes = install(cluster).stdout
    # NOTES.txt tells users the CRD upgrade command test_crds_upgrade_... proves.
    assert f"kubectl {' '.join(CRD_UPGRADE)} <new chart>/crds/" in notes, notes
    for object_key in expected:
        assert exists(cluster, object_key), object_key
    for name in CRD_NAMES:
        wait_for(partial(crd_established, admin, name), timeout=30, message=f"CRD {name} Established")
    wait_for(lambda: policies_served(admin, "default"), timeout=30, message="postgrespolicies to be served")
    assert releases(cluster) == RELEASE
    status = helm("status", RELEASE, "--namespace", SYSTEM_NAMESPACE, kubeconfig=cluster.kubeconfig).stdout
    assert "STATUS: deployed" in status, status

    uninstall(cluster)
    for object_key in expected:
        wait_for(partial(gone, cluster, object_key), timeout=30, message=f"{object_key} deleted")
    # Not the chart's: the namespace (with its Pod Security labels) stays, as after `kubectl apply -f`.
    labels = as_dict(client.CoreV1Api(admin).read_namespace(SYSTEM_NAMESPACE))["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted", labels
    for name in CRD_NAMES:
        assert crd_established(admin, name), f"{name} was removed: Helm must leave crds/ in place"
    assert releases(cluster) == ""


def test_crds_upgrade_with_the_documented_command_not_with_helm_upgrade(
    cluster: ControlPlane, admin: client.ApiClient, tmp_path: Path
) -> None:
    """Helm never upgrades crds/: `helm upgrade` with a changed CRD leaves the old one; the README's command
    (kubectl apply --server-side of the chart's crds/, over the objects Helm created) installs the new one."""
    chart = tmp_path / "pgwarden"
    shutil.copytree(CHART, chart)
    crd_file = chart / "crds" / "pgwarden.dev_postgrespolicies.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    # A field Helm set at install, as a new version's schema changes them.
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema.get("description") != NEXT
    schema["description"] = NEXT
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    install(cluster)
    try:
        helm("upgrade", RELEASE, str(chart), "--namespace", SYSTEM_NAMESPACE, kubeconfig=cluster.kubeconfig)
        assert crd_description(admin) != NEXT, "helm upgrade changed a CRD"
        applied = cluster.kubectl(*CRD_UPGRADE, str(chart / "crds"), check=False)
        assert applied.returncode == 0, applied.stderr
        assert crd_description(admin) == NEXT
        wait_for(partial(crd_established, admin, CRD_NAMES[0]), timeout=30, message="CRD Established")
    finally:
        uninstall(cluster)


def test_install_for_chosen_namespaces_grants_there_only(
    cluster: ControlPlane, admin: client.ApiClient, tmp_path: Path
) -> None:
    """watchNamespaces and sidecar.namespaces: Roles in those namespaces; the operator's ServiceAccount may
    read policies and pods and peer there, nowhere else, and nothing cluster-wide; uninstall removes them."""
    watched, sidecars, other = (new_namespace(admin, prefix=p) for p in ("watched", "sidecar", "other"))
    values = {"watchNamespaces": [watched], "sidecar": {"namespaces": [sidecars]}}
    path = values_file(values, tmp_path)
    expected = by_key(render("-f", str(path)))
    assert ("Role", "pgwarden", watched) in expected
    assert ("Role", "pgwarden-sidecar", sidecars) in expected
    install(cluster, "-f", str(path))
    try:
        for object_key in expected:
            assert exists(cluster, object_key), object_key
        # RBAC is in force once the authorizer's watch has seen the binding.
        wait_for(lambda: can_i(cluster, "list", "postgrespolicies.pgwarden.dev", watched), timeout=30, message="Role")
        for verb, resource in [
            ("watch", "pods"),
            ("get", "secrets"),
            ("patch", "postgrespolicies.pgwarden.dev"),
            ("create", "kopfpeerings.kopf.dev"),
            ("patch", "kopfpeerings.kopf.dev/pgwarden"),
        ]:
            assert can_i(cluster, verb, resource, watched), (verb, resource)
        for namespace in (other, sidecars):
            assert not can_i(cluster, "list", "postgrespolicies.pgwarden.dev", namespace), namespace
            assert not can_i(cluster, "get", "secrets", namespace), namespace
        assert not can_i(cluster, "list", "clusterkopfpeerings.kopf.dev", watched)
        assert not can_i(cluster, "list", "secrets", watched)
        assert not can_i(cluster, "patch", "kopfpeerings.kopf.dev/other", watched)
    finally:
        uninstall(cluster)
    for object_key in expected:
        wait_for(partial(gone, cluster, object_key), timeout=30, message=f"{object_key} deleted")


def chart_args(docs: list[dict[str, Any]]) -> list[str]:
    """The rendered Deployment's arguments, minus the ports (the test process gets free ones)."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return [a for a in container["args"] if not a.startswith(("--metrics-port", "--health-port"))]


@pytest.mark.pg
def test_operator_enforces_with_the_namespaced_rbac_of_the_chart(
    cluster: ControlPlane, admin: client.ApiClient, tmp_path: Path
) -> None:
    """watchNamespaces end to end: the operator, run with the chart's arguments as the chart's ServiceAccount
    (a TokenRequest token, as a pod mounts), reaps idle sessions in the watched namespace, writes status and
    Events, peers through the KopfPeering it creates there, and is refused nothing: the Role is enough."""
    watched = new_namespace(admin, prefix="watched")
    path = values_file({"watchNamespaces": [watched]}, tmp_path)
    args = chart_args(render("-f", str(path)))
    assert args == [f"--namespace={watched}"]
    install(cluster, "-f", str(path))
    operator: OperatorProcess | None = None
    try:
        wait_for(lambda: can_i(cluster, "list", "postgrespolicies.pgwarden.dev", watched), timeout=30, message="Role")
        token = cluster.token_for(SYSTEM_NAMESPACE, "pgwarden")
        kubeconfig = cluster.kubeconfig_for_token(token, tmp_path / "pgwarden.kubeconfig")
        with running_server(PG_MAJOR, host=next_host(), hba="password") as server:
            prepare_example_server(server)
            policy = fast_idle_reaper(server.port)
            name = policy["metadata"]["name"]
            apply_documents(cluster, watched, [example_secret()], tmp_path / "secret.yaml")
            create_running_pod(admin, watched, "db-0", policy["spec"]["selector"]["matchLabels"], server.host)
            doomed, survivors = open_session_mix(server)
            operator = OperatorProcess(kubeconfig, [], tmp_path, extra=args, env={"POD_NAME": "pgwarden-7f9c-ab12c"})
            wait_for(lambda: operator.healthy() or operator.proc.poll() is not None, timeout=60, message="healthz")
            assert operator.proc.poll() is None, f"operator exited:\n{operator.logs()[-5000:]}"
            apply_documents(cluster, watched, [policy], tmp_path / "policy.yaml")

            for pid in doomed:
                server.wait_gone(pid, timeout=30)
            assert all(server.alive(pid) for pid in survivors)
            wait_for(lambda: terminated_total(admin, watched, name) >= 3, timeout=30, message="status totals")
            ready = condition(get_policy(admin, watched, name), ConditionType.READY)
            assert ready is not None
            assert ready["status"] == "True", ready
            wait_for(
                lambda: any(e.reason == EventReason.SESSIONS_TERMINATED for e in events(admin, watched, name)),
                timeout=30,
                message="a SessionsTerminated event",
            )
            peering = client.CustomObjectsApi(admin).get_namespaced_custom_object(
                "kopf.dev", "v1", watched, "kopfpeerings", "pgwarden"
            )
            assert len(cast(dict[str, Any], peering).get("status") or {}) == 1, peering
        logs = operator.logs()
        assert "forbidden" not in logs.lower(), f"the operator was refused something:\n{logs[-5000:]}"
        assert "'code': 403" not in logs
    finally:
        if operator is not None:
            operator.stop()
            print(f"--- operator log {operator.log_path} ---\n{operator.logs()[-8000:]}")
        uninstall(cluster)
