"""Kubernetes objects for tests against a control plane that has no kubelet, scheduler or controllers.

Without a namespace controller a deleted namespace never goes away, so each test gets a fresh one and
nothing waits for deletion. Without kubelet no Pod ever runs: tests create a Pod that stays unscheduled
(no nodeName, so deleting it needs no kubelet) and write its status through the `pods/status`
subresource, as kubelet would: phase Running, a 127.0.0.x podIP where a test PostgreSQL listens, Ready.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from kubernetes import client
from pydantic import BaseModel

from tests.harness.postgres import wait_for

MERGE_PATCH = "application/merge-patch+json"
CONTAINER = "postgres"


def as_dict(obj: BaseModel) -> dict[str, Any]:
    """The wire form of a client model (camelCase keys, ISO timestamps, no nulls), as kopf hands bodies over."""
    return obj.model_dump(mode="json", by_alias=True, exclude_none=True)


def new_namespace(api: client.ApiClient, prefix: str = "test") -> str:
    """Create a namespace with a unique name and return the name."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    metadata = client.V1ObjectMeta(name=name, labels={"pgwarden.dev/test-harness": "true"})
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=metadata))
    return name


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def running_status(pod_ip: str, image: str) -> dict[str, Any]:
    """A `status` as kubelet reports a started, ready single-container Pod."""
    now = _now()
    conditions = [
        {"type": kind, "status": "True", "lastTransitionTime": now}
        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    container = {
        "name": CONTAINER,
        "image": image,
        "imageID": "",
        "ready": True,
        "started": True,
        "restartCount": 0,
        "state": {"running": {"startedAt": now}},
    }
    return {
        "phase": "Running",
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": now,
        "conditions": conditions,
        "containerStatuses": [container],
    }


def create_running_pod(
    api: client.ApiClient,
    namespace: str,
    name: str,
    labels: dict[str, str],
    pod_ip: str,
    annotations: dict[str, str] | None = None,
    image: str = "postgres:18",
) -> dict[str, Any]:
    """Create an unscheduled Pod and mark it Running and Ready at `pod_ip`; returns the Pod as a dict."""
    core = client.CoreV1Api(api)
    metadata = client.V1ObjectMeta(name=name, labels=labels, annotations=annotations)
    spec = client.V1PodSpec(containers=[client.V1Container(name=CONTAINER, image=image)])
    core.create_namespaced_pod(namespace, client.V1Pod(metadata=metadata, spec=spec))
    pod = core.patch_namespaced_pod_status(
        name, namespace, {"status": running_status(pod_ip, image)}, _content_type=MERGE_PATCH
    )
    return as_dict(pod)


def read_pod(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    """The Pod as a dict in wire form."""
    return as_dict(client.CoreV1Api(api).read_namespaced_pod(name, namespace))


def set_pod_labels(api: client.ApiClient, namespace: str, name: str, labels: dict[str, str | None]) -> dict[str, Any]:
    """Merge `labels` into the Pod's labels (a None value removes that label); returns the Pod."""
    pod = client.CoreV1Api(api).patch_namespaced_pod(
        name, namespace, {"metadata": {"labels": labels}}, _content_type=MERGE_PATCH
    )
    return as_dict(pod)


def pod_exists(api: client.ApiClient, namespace: str, name: str) -> bool:
    try:
        client.CoreV1Api(api).read_namespaced_pod(name, namespace)
    except client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def delete_pod(api: client.ApiClient, namespace: str, name: str, timeout: float = 10.0) -> None:
    """Delete with grace period 0 (no kubelet will confirm a graceful stop) and wait until it is gone."""
    client.CoreV1Api(api).delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    wait_for(
        lambda: not pod_exists(api, namespace, name), timeout=timeout, message=f"pod {namespace}/{name} to be deleted"
    )
