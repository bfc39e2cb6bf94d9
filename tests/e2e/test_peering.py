"""`pgwarden run` refuses to start unpeered: without its peering object it exits 2 naming the CRD, unless --standalone.

A replica that starts before the peering CRD exists (or without the object) used to fall back to kopf's
standalone mode silently, and two such replicas both enforced for their whole life. Now the operator creates
the object when it may, and otherwise refuses before kopf, the metrics port or any connection starts.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.fixtures.operator import (
    PEERING_CRDS,
    PEERING_NAME,
    REPO,
    OperatorFactory,
    apply_crd_file,
    delete_crds,
    kopf_peers,
)
from tests.harness.cli import CODE_UNDER_TEST
from tests.harness.controlplane import ControlPlane
from tests.harness.postgres import free_port, wait_for

pytestmark = [pytest.mark.k8s]

PEERING_CRD_NAMES = ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]


@pytest.fixture
def no_peering_crds(k8s_api: client.ApiClient, pgwarden_crds: None) -> None:
    """The cluster as a fresh install without manifests/peering/ (other tests may have left the CRDs)."""
    delete_crds(k8s_api, PEERING_CRD_NAMES)


@pytest.fixture
def peering_crds_only(k8s_api: client.ApiClient, pgwarden_crds: None) -> Iterator[None]:
    """The peering CRDs installed, no peering object anywhere yet; removed again afterwards."""
    names = apply_crd_file(k8s_api, PEERING_CRDS)
    try:
        yield
    finally:
        delete_crds(k8s_api, names)


def run_unpeered(control_plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    """`pgwarden run ARGS` to its end (it must refuse at once), as a user runs it."""
    command = [sys.executable, "-m", "pgwarden", "run", "--metrics-port", str(free_port())]
    command += ["--health-port", str(free_port()), *args]
    env = dict(CODE_UNDER_TEST, KUBECONFIG=str(control_plane.kubeconfig))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


@pytest.mark.parametrize(
    ("mode", "crd"),
    [(["--all-namespaces"], "clusterkopfpeerings.kopf.dev"), (["--namespace", "{ns}"], "kopfpeerings.kopf.dev")],
    ids=["cluster-wide", "namespaced"],
)
def test_run_without_the_peering_crd_exits_2_naming_it(
    control_plane: ControlPlane, no_peering_crds: None, namespace: str, mode: list[str], crd: str
) -> None:
    done = run_unpeered(control_plane, *(arg.format(ns=namespace) for arg in mode))
    assert done.returncode == 2, done.stderr
    assert crd in done.stderr
    assert repr(PEERING_NAME) in done.stderr
    assert "manifests/peering/" in done.stderr
    assert "--standalone" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_run_standalone_needs_no_peering_crd(
    control_plane: ControlPlane, no_peering_crds: None, namespace: str, run_operator: OperatorFactory
) -> None:
    operator = run_operator([namespace])  # the fixture passes --standalone
    assert operator.healthy()
    assert operator.proc.poll() is None


def test_run_creates_the_namespaced_peering_object_and_peers_through_it(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    peering_crds_only: None,
    namespace: str,
    run_operator: OperatorFactory,
) -> None:
    operator = run_operator([namespace], peering=True)
    # Created by the operator before kopf started, and kopf keeps its record in it.
    assert operator.proc.poll() is None
    records = wait_for(lambda: kopf_peers(k8s_api, namespace), timeout=30, message="the replica's peering record")
    assert len(records) == 1, records
