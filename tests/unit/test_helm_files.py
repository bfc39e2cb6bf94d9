"""The Helm chart's CRDs are the kustomize ones, byte for byte (one source: manifests/crd, manifests/peering),
and its versions are the package's.

Helm installs only what is inside the chart's `crds/`, so the chart carries copies; `make crd` (and `make
chart-files`) writes them. Links would avoid the copies, but helm warns about each link on every command
run against the chart folder. tests/unit/test_crd.py holds manifests/crd to the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pgwarden import __version__

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
CHART_CRDS = MANIFESTS / "helm" / "pgwarden" / "crds"
SOURCES = [
    MANIFESTS / "crd" / "pgwarden.dev_postgrespolicies.yaml",
    MANIFESTS / "peering" / "clusterkopfpeerings.kopf.dev.yaml",
]


@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_chart_crd_is_the_kustomize_file(source: Path) -> None:
    copy = CHART_CRDS / source.name
    assert not copy.is_symlink(), "helm warns about links on every command: keep a copy (make chart-files)"
    assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: run `make chart-files`"


def test_chart_rules_are_the_monitoring_file() -> None:
    """The PrometheusRule the chart renders (prometheusRule.enabled) is manifests/monitoring's, copied."""
    source, copy = MANIFESTS / "monitoring" / "prometheusrule.yaml", CHART_CRDS.parent / "files" / "prometheusrule.yaml"
    assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: run `make chart-files`"


def test_chart_has_no_other_crd() -> None:
    """A CRD only in the chart would be one kustomize users never get."""
    assert sorted(p.name for p in CHART_CRDS.iterdir()) == sorted(p.name for p in SOURCES)


def test_chart_versions_are_the_package_version() -> None:
    """The chart's version and appVersion (the default image tag) follow pyproject.toml, as the manifests' image."""
    chart = yaml.safe_load((CHART_CRDS.parent / "Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == (__version__, __version__)
