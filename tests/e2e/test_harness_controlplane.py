"""The control-plane harness itself: a real API server with CRDs, RBAC, fake-running Pods and kubectl.

These pin down what the e2e suite relies on before any pgwarden code is involved, so a harness fault
shows up here rather than as a puzzling operator failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.harness.controlplane import ControlPlane
from tests.harness.controlplane_assets import K8S_VERSION
from tests.harness.k8s import as_dict, create_running_pod, delete_pod, pod_exists, read_pod, set_pod_labels
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.k8s

GROUP = "harness.pgwarden.test"
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {"size": {"type": "integer", "minimum": 1}},
                            }
                        },
                    }
                },
            }
        ],
    },
}


def _established(api: client.ApiClient, name: str) -> bool:
    crd = as_dict(client.ApiextensionsV1Api(api).read_custom_resource_definition(name))
    conditions = crd.get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def _create_gadget(api: client.ApiClient, namespace: str, name: str, size: int) -> dict[str, Any] | None:
    """Create a Gadget; None while the new resource is not served yet (404)."""
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": {"size": size}}
    try:
        created = client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, "v1", namespace, "gadgets", body)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise
    assert isinstance(created, dict)
    return created


def test_api_server_accepts_a_crd_and_validates_its_objects(k8s_api: client.ApiClient, namespace: str) -> None:
    crd = client.V1CustomResourceDefinition.model_validate(CRD)
    client.ApiextensionsV1Api(k8s_api).create_custom_resource_definition(crd)
    wait_for(lambda: _established(k8s_api, CRD["metadata"]["name"]), timeout=30, message="CRD Established")

    created = wait_for(
        lambda: _create_gadget(k8s_api, namespace, "first", 3), timeout=30, message="gadgets to be served"
    )
    assert created["spec"] == {"size": 3}
    read = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, "v1", namespace, "gadgets", "first")
    assert isinstance(read, dict)
    assert read["metadata"]["uid"] == created["metadata"]["uid"]

    with pytest.raises(client.ApiException) as refused:
        _create_gadget(k8s_api, namespace, "too-small", 0)
    assert refused.value.status == 422


def _may_list_pods(api: client.ApiClient, namespace: str) -> bool:
    try:
        client.CoreV1Api(api).list_namespaced_pod(namespace)
    except client.ApiException as error:
        if error.status == 403:
            return False
        raise
    return True


def _grant_pod_reading(api: client.ApiClient, namespace: str, serviceaccount: str) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    role = {"metadata": {"name": "pod-reader"}, "rules": rules}
    binding = {
        "metadata": {"name": "pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": serviceaccount, "namespace": namespace}],
    }
    rbac.create_namespaced_role(namespace, client.V1Role.model_validate(role))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding.model_validate(binding))


def test_rbac_is_enforced_for_service_account_tokens(
    control_plane: ControlPlane, k8s_api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    token = control_plane.token_for(namespace, "reader")
    with control_plane.api_client(token=token) as as_reader:
        review = as_dict(client.AuthenticationV1Api(as_reader).create_self_subject_review(client.V1SelfSubjectReview()))
        assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"
        with pytest.raises(client.ApiException) as denied:
            client.CoreV1Api(as_reader).list_namespaced_pod(namespace)
        assert denied.value.status == 403

        _grant_pod_reading(k8s_api, namespace, "reader")
        wait_for(lambda: _may_list_pods(as_reader, namespace), timeout=30, message="the RoleBinding to apply")
        with pytest.raises(client.ApiException) as cluster_wide:
            client.CoreV1Api(as_reader).list_pod_for_all_namespaces()
        assert cluster_wide.value.status == 403

    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "reader.kubeconfig")
    can_i = control_plane.kubectl("auth", "can-i", "list", "pods", "-n", namespace, kubeconfig=kubeconfig)
    assert can_i.stdout.strip() == "yes"
    cannot = control_plane.kubectl(
        "auth", "can-i", "get", "secrets", "-n", namespace, kubeconfig=kubeconfig, check=False
    )
    assert (cannot.returncode, cannot.stdout.strip()) == (1, "no")


def test_a_fake_running_pod_shows_its_loopback_ip_and_phase(k8s_api: client.ApiClient, namespace: str) -> None:
    returned = create_running_pod(
        k8s_api, namespace, "db-0", {"app": "db"}, "127.0.0.7", annotations={"pgwarden.dev/test": "yes"}
    )
    assert returned["status"]["podIP"] == "127.0.0.7"

    pod = read_pod(k8s_api, namespace, "db-0")
    status = pod["status"]
    assert (status["phase"], status["podIP"], status["podIPs"]) == ("Running", "127.0.0.7", [{"ip": "127.0.0.7"}])
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert status["containerStatuses"][0]["ready"] is True
    assert "nodeName" not in pod["spec"]
    assert pod["metadata"]["annotations"] == {"pgwarden.dev/test": "yes"}

    set_pod_labels(k8s_api, namespace, "db-0", {"app": None, "role": "primary"})
    selected = as_dict(client.CoreV1Api(k8s_api).list_namespaced_pod(namespace, label_selector="role=primary"))
    assert [(p["metadata"]["name"], p["metadata"]["labels"]) for p in selected["items"]] == [
        ("db-0", {"role": "primary"})
    ]

    delete_pod(k8s_api, namespace, "db-0")
    assert not pod_exists(k8s_api, namespace, "db-0")


def test_kubectl_matches_the_server_version(control_plane: ControlPlane) -> None:
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == K8S_VERSION == "v1.37.2"
    assert versions["clientVersion"]["gitVersion"] == K8S_VERSION
    assert control_plane.kubectl("get", "namespace", "default", "-o", "name").stdout.strip() == "namespace/default"
