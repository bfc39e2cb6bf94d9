"""The PostgresPolicy CRD on a real kube-apiserver: it admits and refuses what the model does.

The CRD is generated from the model (`make crd`) and tests/unit/test_crd.py holds the model to the
corpus; this holds the API server to it, where it counts. Every document of tests/data/policies/ goes
to the API server: valid ones are created and read back (the server's defaults must be the model's),
invalid ones must be refused with the message their `# expect:` line quotes. Then the status
subresource and the printer columns, as `kubectl get` shows them, and the pruning of unknown fields
that only strict field validation turns into an error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy import parse_spec
from pgwarden.policy.api import CRD_NAME, GROUP, KIND, PLURAL, SHORT_NAME, VERSION
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import MERGE_PATCH, as_dict, new_namespace
from tests.harness.manifests import policies_served
from tests.harness.policy_corpus import (
    INVALID,
    MODEL_REFUSES,
    VALID,
    Example,
    apply_crd_defaults,
    load_crd,
    version_schema,
)
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.k8s

APPLY_PATCH = "application/apply-patch+yaml"


def _established(ext: client.ApiextensionsV1Api) -> bool:
    conditions = as_dict(ext.read_custom_resource_definition(CRD_NAME)).get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def crd_namespace(k8s_api: client.ApiClient) -> str:
    """One namespace for this module's policies: the created objects stay apart from other tests'."""
    return new_namespace(k8s_api, prefix="crd")


@pytest.fixture(scope="module")
def served_crd(k8s_api: client.ApiClient, crd_namespace: str) -> dict[str, Any]:
    """Apply manifests/crd/ (create, or replace what an earlier test applied) and wait until it is served."""
    crd = load_crd()
    ext = client.ApiextensionsV1Api(k8s_api)
    try:
        existing = ext.read_custom_resource_definition(CRD_NAME)
    except client.ApiException as error:
        if error.status != 404:
            raise
        ext.create_custom_resource_definition(client.V1CustomResourceDefinition.model_validate(crd))
    else:
        version = as_dict(existing)["metadata"]["resourceVersion"]
        body = {**crd, "metadata": {**crd["metadata"], "resourceVersion": version}}
        ext.replace_custom_resource_definition(CRD_NAME, client.V1CustomResourceDefinition.model_validate(body))
    wait_for(lambda: _established(ext), timeout=30, message=f"CRD {CRD_NAME} to be Established")
    wait_for(lambda: policies_served(k8s_api, crd_namespace), timeout=30, message=f"{PLURAL} to be served")
    return crd


def _body(example: Example, namespace: str) -> dict[str, Any]:
    doc = example.document()
    doc["metadata"]["namespace"] = namespace
    return doc


def _refusal(error: client.ApiException) -> tuple[int, str, str]:
    """(HTTP status, Status reason, message) of a refused request."""
    raw = error.body.decode() if isinstance(error.body, bytes) else str(error.body)
    status = json.loads(raw)
    return error.status, status.get("reason", ""), status.get("message", "")


def _get(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert isinstance(obj, dict)
    return obj


def test_served_crd_has_the_printer_columns_and_schema(k8s_api: client.ApiClient, served_crd: dict[str, Any]) -> None:
    """What the server serves is the file, CEL rules and printer columns included (none dropped on the way)."""
    served_dict = as_dict(client.ApiextensionsV1Api(k8s_api).read_custom_resource_definition(CRD_NAME))
    (version,) = served_dict["spec"]["versions"]
    (expected,) = served_crd["spec"]["versions"]
    assert version["additionalPrinterColumns"] == expected["additionalPrinterColumns"]
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == [
        "Mode",
        "Targets",
        "Ready",
        "Actions",
        "Age",
    ]
    assert version["schema"]["openAPIV3Schema"] == version_schema(served_crd)
    assert served_dict["spec"]["names"]["shortNames"] == [SHORT_NAME]


@pytest.mark.parametrize("example", VALID, ids=lambda e: e.name)
def test_valid_example_is_admitted_with_the_model_defaults(
    k8s_api: client.ApiClient, crd_namespace: str, served_crd: dict[str, Any], example: Example
) -> None:
    """Created for real, read back: the server's defaults are the model's and the model reads the same spec."""
    body = _body(example, crd_namespace)
    client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
        GROUP, VERSION, crd_namespace, PLURAL, body, field_validation="Strict"
    )
    stored = _get(k8s_api, crd_namespace, body["metadata"]["name"])
    spec_schema = version_schema(served_crd)["properties"]["spec"]
    assert stored["spec"] == apply_crd_defaults(example.document()["spec"], spec_schema)
    assert stored["metadata"]["generation"] == 1
    read_back = parse_spec(stored["spec"])
    if example.name not in MODEL_REFUSES:  # the model refuses the nulls in the file, not the stored spec
        assert read_back == parse_spec(example.document()["spec"])


@pytest.mark.parametrize("example", INVALID, ids=lambda e: e.name)
def test_invalid_example_is_refused_with_its_message(
    k8s_api: client.ApiClient, crd_namespace: str, served_crd: dict[str, Any], example: Example
) -> None:
    """Refused as a whole (dry run: nothing would be stored anyway), with the message the file quotes."""
    with pytest.raises(client.ApiException) as refused:
        client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
            GROUP,
            VERSION,
            crd_namespace,
            PLURAL,
            _body(example, crd_namespace),
            dry_run="All",
            field_validation="Strict",
        )
    status, reason, message = _refusal(refused.value)
    assert (status, reason) == (example.expect_code, "Invalid" if example.expect_code == 422 else "BadRequest")
    assert example.expect is not None
    assert example.expect in message


def test_unknown_fields_are_pruned_unless_validation_is_strict(
    k8s_api: client.ApiClient, crd_namespace: str, served_crd: dict[str, Any]
) -> None:
    """Why fieldValidation=Strict matters: without it a misspelt age is dropped and the rule changes meaning.

    kubectl asks for strict validation by default; other clients (and GitOps tools) must ask for it.
    """
    (example,) = [e for e in INVALID if e.name == "unknown-field-typo.yaml"]
    body = _body(example, crd_namespace)
    body["metadata"]["name"] = "typo-pruned"
    client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
        GROUP, VERSION, crd_namespace, PLURAL, body, field_validation="Ignore"
    )
    (rule,) = _get(k8s_api, crd_namespace, "typo-pruned")["spec"]["sessions"]
    assert "stateAgee" not in rule
    assert rule == {"name": "idle", "action": "terminate", "queryAge": "1h"}


STATUS: dict[str, Any] = {
    "observedGeneration": 1,
    "targetCount": 2,
    "readyTargets": 2,
    "conditions": [
        {
            "type": "Degraded",
            "status": "False",
            "reason": "TargetsEvaluated",
            "message": "all 2 targets evaluated",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 1,
        },
        {
            "type": "Ready",
            "status": "True",
            "reason": "TargetsEvaluated",
            "message": "all 2 targets evaluated",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 1,
        },
    ],
    "targets": [
        {
            "pod": "db-0",
            "podIP": "127.0.0.10",
            "enforcer": "controller",
            "serverVersion": "18.1",
            "backends": {"client backend": 12, "autovacuum launcher": 1},
            "clientStates": {"idle": 9, "active": 3},
            "lastCycleTime": "2026-01-02T03:04:05Z",
            "lastActionTime": "2026-01-02T03:04:05Z",
            "lastActions": [
                {
                    "rule": "idle",
                    "action": "terminate",
                    "pid": 4242,
                    "user": "app",
                    "database": "shop",
                    "applicationName": "web",
                    "clientAddress": "127.0.0.1",
                    "state": "idle",
                    "done": True,
                }
            ],
            "autovacuum": {"maxWorkers": {"desired": 2, "inForce": 3, "pendingRestart": True}, "cancelled": [4711]},
        },
        {"pod": "db-1", "podIP": "127.0.0.11", "enforcer": "sidecar", "error": "connection refused"},
    ],
    "totals": {"actions": 7, "terminated": 5, "cancelled": 1, "autovacuumCancelled": 1},
    "kopf": {"progress": {"anything": {"kopf": "keeps"}}},
}


def test_status_subresource_and_printer_columns(
    control_plane: ControlPlane, k8s_api: client.ApiClient, crd_namespace: str, served_crd: dict[str, Any]
) -> None:
    """A status write goes through /status, leaves the spec's generation alone, and fills kubectl's columns."""
    (example,) = [e for e in VALID if e.name == "idle-reaper.yaml"]
    body = _body(example, crd_namespace)
    body["metadata"]["name"] = "with-status"
    objects = client.CustomObjectsApi(k8s_api)
    objects.create_namespaced_custom_object(GROUP, VERSION, crd_namespace, PLURAL, body)
    ignored = {"spec": {"enforcementAction": "dryRun"}, "status": STATUS}
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, crd_namespace, PLURAL, "with-status", ignored, _content_type=MERGE_PATCH
    )
    stored = _get(k8s_api, crd_namespace, "with-status")
    assert stored["status"] == STATUS
    assert stored["spec"]["enforcementAction"] == "enforce"  # /status never changes the spec...
    assert stored["metadata"]["generation"] == 1  # ...nor bumps generation, so handlers are not retriggered

    table = control_plane.kubectl("get", "pgpolicy", "with-status", "-n", crd_namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODE", "TARGETS", "READY", "ACTIONS", "AGE"]
    assert table[1].split()[:5] == ["with-status", "enforce", "2", "True", "7"]
    wide = control_plane.kubectl("get", "pgpolicy", "with-status", "-n", crd_namespace, "-o", "wide").stdout
    header, row = wide.splitlines()
    assert header.split()[-4:] == ["INTERVAL", "READY-TARGETS", "DEGRADED", "REASON"]
    assert row.split()[-4:] == ["30s", "2", "False", "TargetsEvaluated"]


def test_status_targets_merge_per_pod_under_server_side_apply(
    k8s_api: client.ApiClient, crd_namespace: str, served_crd: dict[str, Any]
) -> None:
    """status.targets is a list-map keyed by pod: sidecars applying their own entry keep each other's."""
    (example,) = [e for e in VALID if e.name == "idle-reaper.yaml"]
    body = _body(example, crd_namespace)
    body["metadata"]["name"] = "merged-targets"
    objects = client.CustomObjectsApi(k8s_api)
    objects.create_namespaced_custom_object(GROUP, VERSION, crd_namespace, PLURAL, body)
    for pod in ("db-0", "db-1", "db-2"):
        entry = {"pod": pod, "podIP": f"127.0.0.{20 + int(pod[-1])}", "enforcer": "sidecar", "serverVersion": "18.1"}
        patch = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": "merged-targets", "namespace": crd_namespace},
            "status": {"targets": [entry]},
        }
        objects.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            crd_namespace,
            PLURAL,
            "merged-targets",
            patch,
            field_manager=f"pgwarden-sidecar-{pod}",
            force=True,
            _content_type=APPLY_PATCH,
        )
    targets = _get(k8s_api, crd_namespace, "merged-targets")["status"]["targets"]
    assert sorted(t["pod"] for t in targets) == ["db-0", "db-1", "db-2"]
