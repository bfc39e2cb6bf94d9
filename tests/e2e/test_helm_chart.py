"""manifests/helm/pgwarden renders what manifests/ installs, takes the values it documents and refuses others.

No API server here: `helm lint`, `helm template` and `kubectl kustomize` are offline. The binaries are the
suite's pinned builds (tests/harness/helm_assets.py, controlplane_assets.py), hence the `k8s` marker.

The default render is compared with `kubectl kustomize manifests/` object by object: every field equal
except labels (Helm adds its own; kustomize's must all be there too). That covers the security contexts,
RBAC rules, probes, ports, resources and arguments at once. Two differences are by design: the Namespace
(Helm's convention is `helm install --create-namespace`, not a Namespace in the chart) and where the
CRDs live (`crds/`, rendered only with `--include-crds`; copies of manifests/crd and manifests/peering,
held equal by tests/unit/test_helm_files.py).
"""

from __future__ import annotations

import copy
import difflib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.controlplane_assets import find_binaries
from tests.harness.helm import CHART, by_key, helm, render, template, values_file
from tests.harness.manifests import MANIFESTS, SYSTEM_NAMESPACE, documents

pytestmark = pytest.mark.k8s

NAMESPACE_KEY = ("Namespace", SYSTEM_NAMESPACE, "")
# Label keys the chart may add to kustomize's: Helm's conventions, and part-of on the pod template too (kustomize
# puts it on objects only). Anything else must come from kustomize.
EXTRA_LABELS = {
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "helm.sh/chart",
    "app.kubernetes.io/part-of",
}


def kustomized() -> list[dict[str, Any]]:
    done = subprocess.run(
        [str(find_binaries().kubectl), "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def without_labels(doc: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A copy of `doc` without the labels of its metadata and pod template, and those label maps."""
    doc = copy.deepcopy(doc)
    removed = [doc["metadata"].pop("labels", {})]
    template_meta = doc.get("spec", {}).get("template", {}).get("metadata")
    if template_meta is not None:
        removed.append(template_meta.pop("labels", {}))
    return doc, removed


def diff(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    lines = difflib.unified_diff(
        yaml.safe_dump(expected).splitlines(), yaml.safe_dump(actual).splitlines(), "kustomize", "helm", lineterm=""
    )
    return "\n".join(lines)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


# -- lint -----------------------------------------------------------------------------------------------------

EVERY_OPTION: dict[str, Any] = {
    "image": {"repository": "registry.example.com:5000/team/pgwarden", "digest": "sha256:" + "ab" * 32},
    "replicas": 3,
    "watchNamespaces": ["db-a", "db-b"],
    "ports": {"metrics": 9191, "health": 8181},
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
    "sidecar": {"namespaces": ["db-c"]},
    "podDisruptionBudget": {"enabled": False},
    "networkPolicy": {"enabled": False},
    "commonLabels": {"team": "dba"},
    "commonAnnotations": {"owner": "dba@example.com"},
    "podLabels": {"tier": "ops"},
    "podAnnotations": {"note": "x"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
    "priorityClassName": "system-cluster-critical",
    "imagePullSecrets": [{"name": "regcred"}],
}


@pytest.mark.parametrize("values", [None, EVERY_OPTION], ids=["defaults", "every-option"])
def test_helm_lint_strict_is_clean(values: dict[str, Any] | None, tmp_path: Path) -> None:
    """`helm lint --strict` passes with no warning or error (the one INFO, "icon is recommended", aside)."""
    extra = ["-f", str(values_file(values, tmp_path))] if values else []
    done = helm("lint", "--strict", str(CHART), *extra, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "1 chart(s) linted, 0 chart(s) failed" in output, output
    findings = [line for line in output.splitlines() if line.startswith("[")]
    assert findings == ["[INFO] Chart.yaml: icon is recommended"], output


# -- the default render is what kustomize installs -----------------------------------------------------------


def test_default_render_has_the_objects_kustomize_has() -> None:
    """Same (kind, name, namespace) set; the Namespace is Helm's --create-namespace, the CRDs are crds/."""
    chart = set(by_key(render("--include-crds")))
    kustomize = set(by_key(kustomized()))
    assert chart == kustomize - {NAMESPACE_KEY}, (
        f"only in helm: {chart - kustomize}, only in kustomize: {kustomize - chart}"
    )
    without_crds = set(by_key(render()))
    assert chart - without_crds == {k for k in chart if k[0] == "CustomResourceDefinition"}


def test_default_render_equals_kustomize_but_for_labels() -> None:
    """Every object field by field (security contexts, RBAC, probes, ports, resources, args); labels a superset."""
    chart = by_key(render("--include-crds"))
    for object_key, expected in by_key(kustomized()).items():
        if object_key == NAMESPACE_KEY:
            continue
        want, want_labels = without_labels(expected)
        got, got_labels = without_labels(chart[object_key])
        assert got == want, f"{object_key} differs:\n{diff(want, got)}"
        if object_key[0] == "CustomResourceDefinition":
            # crds/ is installed as is, never templated: no labels at all, not even kustomize's part-of.
            assert got_labels == [{}], object_key
            continue
        for wanted, have in zip(want_labels, got_labels, strict=True):
            assert wanted.items() <= have.items(), f"{object_key}: kustomize's labels {wanted} missing from {have}"
            assert set(have) - set(wanted) <= EXTRA_LABELS, f"{object_key}: unexpected labels {have}"


# -- values take effect ---------------------------------------------------------------------------------------


def test_watch_namespaces_give_args_and_a_role_in_each_instead_of_the_cluster_role(tmp_path: Path) -> None:
    """A list: `--namespace` per entry, a Role + RoleBinding in each with the ClusterRole's rules (kopfpeerings
    for clusterkopfpeerings), and nothing cluster-wide but the CRDs."""
    docs = render("-f", str(values_file({"watchNamespaces": ["db-a", "db-b"]}, tmp_path)))
    container = pod_spec(docs)["containers"][0]
    assert container["args"] == ["--namespace=db-a", "--namespace=db-b", "--metrics-port=9090", "--health-port=8080"]
    kinds = {(d["kind"], d["metadata"].get("namespace", "")) for d in docs}
    assert not {k for k in kinds if k[0].startswith("Cluster")}, kinds
    cluster_rules = documents(MANIFESTS / "rbac" / "clusterrole.yaml")[0]["rules"]
    expected_rules = yaml.safe_load(yaml.safe_dump(cluster_rules).replace("clusterkopfpeerings", "kopfpeerings"))
    for ns in ("db-a", "db-b"):
        (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == ns]
        assert role["metadata"]["name"] == "pgwarden"
        assert role["rules"] == expected_rules
        (binding,) = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == ns]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pgwarden"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pgwarden", "namespace": SYSTEM_NAMESPACE}]


def test_sidecar_namespaces_get_the_sidecar_rbac_of_manifests_sidecar(tmp_path: Path) -> None:
    """Each listed namespace gets manifests/sidecar's three objects, with the same rules and subject."""
    docs = render("-f", str(values_file({"sidecar": {"namespaces": ["db-a", "db-b"]}}, tmp_path)))
    shipped = {
        d["kind"]: d
        for ref in ("serviceaccount", "role", "rolebinding")
        for d in documents(MANIFESTS / "sidecar" / f"{ref}.yaml")
    }
    for ns in ("db-a", "db-b"):
        mine = {d["kind"]: d for d in docs if d["metadata"].get("namespace") == ns}
        assert set(mine) == {"ServiceAccount", "Role", "RoleBinding"}
        for kind, doc in mine.items():
            assert doc["metadata"]["name"] == shipped[kind]["metadata"]["name"]
        assert mine["Role"]["rules"] == shipped["Role"]["rules"]
        assert mine["RoleBinding"]["roleRef"] == shipped["RoleBinding"]["roleRef"]
        (subject,) = mine["RoleBinding"]["subjects"]
        assert subject == {**shipped["RoleBinding"]["subjects"][0], "namespace": ns}


def test_every_option_lands_where_it_should(tmp_path: Path) -> None:
    """Image by digest, replicas, ports, placement, labels and annotations, optional objects on and off."""
    docs = render("-f", str(values_file(EVERY_OPTION, tmp_path)))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    assert container["image"] == "registry.example.com:5000/team/pgwarden@sha256:" + "ab" * 32
    assert deployment["spec"]["replicas"] == 3
    assert container["args"][-2:] == ["--metrics-port=9191", "--health-port=8181"]
    assert [p["containerPort"] for p in container["ports"]] == [9191, 8181]
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert spec[field] == EVERY_OPTION[field], field
    template_meta = deployment["spec"]["template"]["metadata"]
    assert template_meta["labels"]["tier"] == "ops"
    assert template_meta["annotations"] == {"note": "x", "owner": "dba@example.com"}
    for doc in docs:
        assert doc["metadata"]["labels"]["team"] == "dba", doc["kind"]
        assert doc["metadata"]["annotations"] == {"owner": "dba@example.com"}, doc["kind"]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"PodDisruptionBudget", "NetworkPolicy"}
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9191, "targetPort": "metrics"}]


def test_service_monitor_is_the_kustomize_component_when_enabled(tmp_path: Path) -> None:
    """Off by default; on, the same spec as manifests/components/servicemonitor, plus the extra labels."""
    assert not [d for d in render() if d["kind"] == "ServiceMonitor"]
    values = {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}
    (monitor,) = [d for d in render("-f", str(values_file(values, tmp_path))) if d["kind"] == "ServiceMonitor"]
    (shipped,) = documents(MANIFESTS / "components" / "servicemonitor" / "servicemonitor.yaml")
    assert monitor["spec"] == shipped["spec"]
    assert monitor["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert shipped["metadata"]["labels"].items() <= monitor["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


# -- wrong values fail before anything is installed -----------------------------------------------------------

SCHEMA_ERROR = "values don't meet the specifications of the schema"

# (id, values, a fragment of helm's message that says what is wrong where)
HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("negative-replicas", {"replicas": -1}, "/replicas"),
    ("replicas-as-string", {"replicas": "2"}, "/replicas"),
    ("image-with-spaces", {"image": {"repository": "my registry/pg warden"}}, "/image/repository"),
    ("image-upper-case", {"image": {"repository": "Localhost/PGWarden"}}, "/image/repository"),
    ("tag-with-colon", {"image": {"tag": "1.0:latest"}}, "/image/tag"),
    ("short-digest", {"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ("unknown-pull-policy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("misspelt-top-level-key", {"replica": 2}, "replica"),
    ("misspelt-image-key", {"image": {"tagg": "1"}}, "tagg"),
    ("namespaces-as-string", {"watchNamespaces": "db-a"}, "/watchNamespaces"),
    ("namespace-not-dns", {"watchNamespaces": ["Bad_NS"]}, "/watchNamespaces/0"),
    ("duplicate-namespace", {"sidecar": {"namespaces": ["db-a", "db-a"]}}, "/sidecar/namespaces"),
    ("port-out-of-range", {"ports": {"metrics": 70000, "health": 8080}}, "/ports/metrics"),
    ("port-as-string", {"ports": {"metrics": "9090", "health": 8080}}, "/ports/metrics"),
    ("memory-not-a-quantity", {"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ("resources-unknown-key", {"resources": {"limit": {"memory": "1Gi"}}}, "limit"),
    ("monitor-enabled-as-string", {"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
    ("interval-not-a-duration", {"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
    ("toleration-operator", {"tolerations": [{"key": "a", "operator": "Maybe"}]}, "/tolerations/0/operator"),
    ("affinity-unknown-key", {"affinity": {"nodeAffinty": {}}}, "nodeAffinty"),
    ("label-value-not-a-string", {"commonLabels": {"team": 7}}, "/commonLabels/team"),
    ("label-key-with-space", {"commonLabels": {"my team": "dba"}}, "additional properties 'my team' not allowed"),
    ("label-value-with-space", {"podLabels": {"team": "the dbas"}}, "/podLabels/team"),
]


@pytest.mark.parametrize(("values", "where"), [(v, w) for _, v, w in HOSTILE], ids=[i for i, _, _ in HOSTILE])
def test_hostile_values_fail_on_the_schema(values: dict[str, Any], where: str, tmp_path: Path) -> None:
    """`helm template -f` refuses the file on values.schema.json, naming the offending value; nothing is rendered."""
    done = template("-f", str(values_file(values, tmp_path)), check=False)
    assert done.returncode != 0, done.stdout
    assert done.stdout == ""
    assert SCHEMA_ERROR in done.stderr, done.stderr
    assert where in done.stderr, done.stderr


def test_same_port_twice_is_refused_by_the_chart(tmp_path: Path) -> None:
    """What a schema cannot say: the two ports must differ (each server binds its own)."""
    done = template("-f", str(values_file({"ports": {"metrics": 9090, "health": 9090}}, tmp_path)), check=False)
    assert done.returncode != 0
    assert "ports.metrics and ports.health must differ" in done.stderr, done.stderr


def test_prometheus_rule_off_renders_nothing_and_on_renders_the_monitoring_rules(tmp_path: Path) -> None:
    """Off (the default): no PrometheusRule. On: manifests/monitoring's rules, in the release's namespace, with
    the chart's labels and the extra ones asked for."""
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]
    values = {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}}}
    (rule,) = [d for d in render("-f", str(values_file(values, tmp_path))) if d["kind"] == "PrometheusRule"]
    (source,) = documents(MANIFESTS / "monitoring" / "prometheusrule.yaml")
    assert rule["spec"] == source["spec"]
    assert rule["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
