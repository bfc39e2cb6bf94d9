"""The monitoring component, used the way its comment says, renders the PrometheusRule next to pgwarden."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.harness.controlplane import ControlPlane
from tests.harness.manifests import MANIFESTS

pytestmark = [pytest.mark.k8s]


def test_monitoring_component_adds_the_prometheusrule_in_pgwarden_namespace(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    components = [MANIFESTS / "components" / "servicemonitor", MANIFESTS / "monitoring"]
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only, as a user's overlay beside the checkout would have them
                "resources": [os.path.relpath(MANIFESTS, overlay)],
                "components": [os.path.relpath(path, overlay) for path in components],
            }
        )
    )
    rendered = control_plane.kubectl("kustomize", str(overlay)).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert rule["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert [o["kind"] for o in objects].count("ServiceMonitor") == 1
    source = yaml.safe_load((MANIFESTS / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"] == source["spec"]  # the rules promtool tested, unchanged by kustomize
    # The base alone stays without it: the component is optional.
    base = control_plane.kubectl("kustomize", str(MANIFESTS)).stdout
    assert "PrometheusRule" not in base
