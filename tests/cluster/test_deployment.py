"""The shipped Deployment on a real kubelet, with the image built from the project's Dockerfile."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import REPO, SYSTEM_NAMESPACE, deployment_available, kubectl, kubectl_json
from tests.cluster.postgres_pod import apply, credentials_secret, fast_idle_reaper
from tests.harness.cluster import AUDIT_LOG
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.cluster

SELECTOR = "app.kubernetes.io/name=pgwarden,app.kubernetes.io/component=controller"
DEPLOYMENT = REPO / "manifests" / "operator" / "deployment.yaml"
SERVICE_ACCOUNT = f"system:serviceaccount:{SYSTEM_NAMESPACE}:pgwarden"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# What the kubelet's projected `kube-api-access-*` volume holds: the bound token, the cluster's CA and the
# pod's namespace. Nothing else may reach the pod as a credential.
PROJECTED_SOURCES = ["serviceAccountToken", "configMap", "downwardAPI"]
# Run inside the container by its own interpreter: who am I, and may I write outside /tmp?
PROBE = """
import errno, os
try:
    open("/opt/pgwarden/written-at-run-time", "w")
    root = "writable"
except OSError as error:
    root = errno.errorcode[error.errno]
with open("/tmp/scratch", "w") as tmp:
    tmp.write("ok")
print(os.getuid(), os.getgid(), root, "tmp-writable")
"""


def pods() -> list[dict[str, Any]]:
    return list(kubectl_json("get", "pods", "-n", SYSTEM_NAMESPACE, "-l", SELECTOR)["items"])


def test_deployment_becomes_available_with_two_replicas_non_root_read_only(pgwarden_running: None) -> None:
    assert deployment_available(2)
    running = [p for p in pods() if p["status"].get("phase") == "Running"]
    assert len(running) == 2
    for pod in running:
        name = pod["metadata"]["name"]
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] is True, name  # the readiness probe passed
        assert status["restartCount"] == 0, name  # the liveness probe never failed, no crash
        assert status["image"] == "localhost/pgwarden:dev"
        probe = kubectl("exec", "-n", SYSTEM_NAMESPACE, name, "--", "python", "-c", PROBE)
        assert probe.stdout.split() == ["10001", "10001", "EROFS", "tmp-writable"]
        # /healthz answers on the pod's own address, as the kubelet's probes see it.
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/healthz", timeout=5) as response:
            assert response.status == 200
    (container,) = running[0]["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_image_runs_the_entrypoint_the_dockerfile_declares(pgwarden_running: None) -> None:
    """The container's process is the Dockerfile's ENTRYPOINT (`pgwarden run`) with the manifest's args."""
    (pod, *_) = pods()
    cmdline = kubectl("exec", "-n", SYSTEM_NAMESPACE, pod["metadata"]["name"], "--", "cat", "/proc/1/cmdline")
    argv = cmdline.stdout.split("\0")
    assert argv[:2] == ["/opt/pgwarden/bin/python", "/opt/pgwarden/bin/pgwarden"]  # the venv's script
    assert argv[2:5] == ["run", "--all-namespaces", "--metrics-port=9090"]


def credentials_in(pod: dict[str, Any]) -> None:
    """Fails unless the pod's only credential is the kubelet's projected ServiceAccount token: volumes are
    emptyDirs and the one projected token volume; no Secret volume, no hostPath; no env from Secrets."""
    spec = pod["spec"]
    for volume in spec["volumes"]:
        (kind,) = set(volume) - {"name"}
        assert kind in ("emptyDir", "projected"), volume
        if kind == "projected":
            sources = volume["projected"]["sources"]
            assert [next(iter(source)) for source in sources] == PROJECTED_SOURCES, volume
            assert sources[0]["serviceAccountToken"]["path"] == "token"
            assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    for container in spec["containers"] + spec.get("initContainers", []):
        assert "envFrom" not in container, container["name"]
        for variable in container.get("env", []):
            assert "secretKeyRef" not in variable.get("valueFrom", {}), variable["name"]
        mounted = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
        assert mounted[TOKEN_DIR]["readOnly"] is True


def audit_events() -> list[dict[str, Any]]:
    """The API server's audit log (tests/harness/cluster.py: Metadata level, rotated once)."""
    events: list[dict[str, Any]] = []
    for path in sorted(AUDIT_LOG.parent.glob(AUDIT_LOG.stem + "*" + AUDIT_LOG.suffix)):
        events.extend(json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return events


def status_writes(namespace: str) -> list[dict[str, Any]]:
    """Completed writes of PostgresPolicy status in `namespace`, as the API server recorded them."""
    return [
        event
        for event in audit_events()
        if event["stage"] == "ResponseComplete"
        and event.get("objectRef", {}).get("resource") == "postgrespolicies"
        and event["objectRef"].get("subresource") == "status"
        and event["objectRef"].get("namespace") == namespace
        and event["verb"] in ("patch", "update")
        and event["responseStatus"]["code"] < 300
    ]


def test_its_service_account_token_is_all_it_uses(namespace: str) -> None:
    """The running replicas carry no credential but the projected ServiceAccount token, and the API server
    sees the operator's writes (a policy's status) as that ServiceAccount, from a token bound to its pod."""
    template = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    running = [p for p in pods() if p["status"].get("phase") == "Running"]
    assert len(running) == 2
    for pod in running:
        assert pod["spec"]["serviceAccountName"] == "pgwarden"
        assert pod["spec"]["automountServiceAccountToken"] is template["automountServiceAccountToken"]
        credentials_in(pod)

    apply(namespace, credentials_secret(namespace), fast_idle_reaper(namespace))
    writes = wait_for(lambda: status_writes(namespace), timeout=60, interval=0.5, message="a status write audited")
    addresses = {pod["metadata"]["name"]: pod["status"]["podIP"] for pod in running}
    for write in writes:
        user = write["user"]
        assert user["username"] == SERVICE_ACCOUNT
        # A bound token (the projected volume's), not a long-lived Secret token: it names its pod, and the
        # request came from that pod's own address.
        (pod_name,) = user["extra"]["authentication.kubernetes.io/pod-name"]
        assert write["sourceIPs"] == [addresses[pod_name]]
    # And every request from the operator's namespace came as that one ServiceAccount.
    ours = [e for e in audit_events() if f"system:serviceaccounts:{SYSTEM_NAMESPACE}" in e["user"].get("groups", [])]
    assert {e["user"]["username"] for e in ours} == {SERVICE_ACCOUNT}
