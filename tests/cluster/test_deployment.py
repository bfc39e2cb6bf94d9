"""The shipped Deployment on a real kubelet, with the image built from the project's Dockerfile."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest

from tests.cluster.conftest import SYSTEM_NAMESPACE, deployment_available, kubectl, kubectl_json

pytestmark = pytest.mark.cluster

SELECTOR = "app.kubernetes.io/name=pgwarden,app.kubernetes.io/component=controller"
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
