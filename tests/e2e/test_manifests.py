"""manifests/ as users consume it: the real kubectl against a real API server, and the examples run for real.

A user installs with `kubectl apply -k manifests/`; a GitOps tool renders the same kustomization (or the
`crd/` folder alone) and applies it. Both go through kubectl's strict field validation and the API
server's admission, so the proofs here use exactly that: the kubectl the control plane was built with.

- The full install runs on a control plane of this module's own (`fresh_cluster`): a first install must
  meet a cluster that has never seen pgwarden, and what it creates (kopf's peering CRDs, a
  ClusterKopfPeering, a namespace, RBAC) must not leak into the session's shared control plane, where
  other tests run operators that would start peering through it.
- Every example under manifests/examples/ is accepted by a server-side dry run; every document of
  tests/data/policies/invalid/ is refused by kubectl with the message its `# expect:` line quotes.
- Like kopf's own test_examples.py, the seed's idle reaper example is applied for real (stateAge and port
  changed, nothing else) and the operator terminates idle sessions on a real PostgreSQL server, logged in
  as the role pgwarden-role.sql creates, with the credentials Secret of credentials-secret.yaml.

Every wait polls with a deadline. Helpers here are imported by tests/e2e/test_rbac.py.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from pgwarden import __version__
from pgwarden.policy import parse_spec
from pgwarden.policy.api import ConditionType, EventReason
from tests.fixtures.operator import OperatorFactory, crd_established
from tests.fixtures.postgres import PgFactory
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import as_dict, create_running_pod, new_namespace
from tests.harness.manifests import (
    CRD_NAMES,
    EXAMPLES,
    MANIFESTS,
    ROLE,
    ROLE_SCRIPT,
    SYSTEM_NAMESPACE,
    apply_documents,
    documents,
    example_secret,
    fast_idle_reaper,
    install_manifests,
    open_session_mix,
    policies_served,
    prepare_example_server,
    run_role_script,
)
from tests.harness.policies import (
    condition,
    events,
    get_policy,
    next_host,
    terminated_total,
)
from tests.harness.policy_corpus import INVALID, Example
from tests.harness.postgres import wait_for

pytestmark = [pytest.mark.k8s]

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
SUBFOLDERS = ("crd", "peering", "rbac", "operator")
REFUSAL_REASON = {422: "Invalid", 400: "BadRequest"}  # `Error from server (<reason>)` per HTTP status


def role_script_with_optional_grants(major: int, path: Path) -> Path:
    """pgwarden-role.sql with the optional autovacuum statements uncommented, as a user would; 18-only ones on 18+."""
    lines = ROLE_SCRIPT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-- Optional:"))
    statement = re.compile(r"^-- ((?:GRANT|REVOKE) .*;)$")
    enabled = 0
    for i in range(start, len(lines)):
        match = statement.match(lines[i])
        if match and (major >= 18 or "pg_signal_autovacuum_worker" not in match.group(1)):
            lines[i] = match.group(1)
            enabled += 1
    assert enabled >= 4, "the optional section lost its statements"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- fixtures ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    plane: ControlPlane
    first: subprocess.CompletedProcess[str]  # the first `kubectl apply -k manifests/`


@pytest.fixture(scope="module")
def fresh_cluster() -> Iterator[ControlPlane]:
    """A control plane that has never seen pgwarden, for this module only (see the module docstring)."""
    with ControlPlane() as plane:
        yield plane


@pytest.fixture(scope="module")
def installed(fresh_cluster: ControlPlane) -> Install:
    return Install(fresh_cluster, install_manifests(fresh_cluster))


@pytest.fixture(scope="module")
def fresh_api(fresh_cluster: ControlPlane) -> Iterator[client.ApiClient]:
    with fresh_cluster.api_client() as api:
        yield api


# -- rendering ----------------------------------------------------------------------------------------------


def rendered(plane: ControlPlane, folder: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(plane.kubectl("kustomize", str(folder)).stdout) if doc]


def test_kustomize_renders_the_install_and_each_subfolder_alone(control_plane: ControlPlane) -> None:
    """`kubectl kustomize` renders manifests/ (what GitOps tools apply) and every sub-folder on its own."""
    objects = rendered(control_plane, MANIFESTS)
    found = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert found >= {
        ("Namespace", SYSTEM_NAMESPACE),
        *(("CustomResourceDefinition", name) for name in CRD_NAMES),
        ("ServiceAccount", "pgwarden"),
        ("ClusterRole", "pgwarden"),
        ("ClusterRoleBinding", "pgwarden"),
        ("Deployment", "pgwarden"),
        ("Service", "pgwarden-metrics"),
        ("PodDisruptionBudget", "pgwarden"),
        ("NetworkPolicy", "pgwarden"),
    }
    cluster_scoped = {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterKopfPeering",
    }
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pgwarden", where
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == SYSTEM_NAMESPACE, where
        elif obj["kind"] != "ClusterKopfPeering":
            # kustomize's `namespace:` skips the cluster-scoped kinds it knows; a custom kind it does not
            # know (ClusterKopfPeering) gets one, which the API server ignores for a cluster-scoped object.
            assert "namespace" not in obj["metadata"], where
    (binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pgwarden", "namespace": SYSTEM_NAMESPACE}]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"localhost/pgwarden:{__version__}", "image tag must match the package"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "pgwarden"

    for sub in SUBFOLDERS:
        assert rendered(control_plane, MANIFESTS / sub), f"manifests/{sub} renders nothing"
    # The API alone: only CRDs, so a GitOps user can take it without the operator.
    crd_only = rendered(control_plane, MANIFESTS / "crd")
    assert [(o["kind"], o["metadata"]["name"]) for o in crd_only] == [
        ("CustomResourceDefinition", "postgrespolicies.pgwarden.dev")
    ]


def test_crd_folder_applies_alone(control_plane: ControlPlane, k8s_api: client.ApiClient, namespace: str) -> None:
    """`kubectl apply -k manifests/crd` (GitOps taking the API alone): one CRD, served. Shared plane: never deleted."""
    applied = control_plane.kubectl("apply", "-k", str(MANIFESTS / "crd"))
    assert [line.split()[0] for line in applied.stdout.splitlines()] == [
        "customresourcedefinition.apiextensions.k8s.io/postgrespolicies.pgwarden.dev"
    ]
    wait_for(lambda: crd_established(k8s_api, CRD_NAMES[0]), timeout=30, message="CRD Established")
    wait_for(lambda: policies_served(k8s_api, namespace), timeout=30, message="postgrespolicies to be served")


# -- the full install ---------------------------------------------------------------------------------------


def test_apply_installs_everything_in_one_go_on_a_fresh_cluster(installed: Install) -> None:
    """One `kubectl apply -k manifests/` on a cluster that never saw pgwarden must succeed (exit 0)."""
    first = installed.first
    assert first.returncode == 0, first.stderr


def test_everything_rendered_exists_after_install(installed: Install, fresh_api: client.ApiClient) -> None:
    """Each object kustomize renders is on the server; the CRDs are Established; RBAC binds the operator's SA."""
    plane = installed.plane
    expected = {(o["kind"], o["metadata"]["name"]) for o in rendered(plane, MANIFESTS)}
    live = yaml.safe_load(plane.kubectl("get", "-k", str(MANIFESTS), "-o", "yaml").stdout)["items"]
    assert {(o["kind"], o["metadata"]["name"]) for o in live} == expected
    for name in CRD_NAMES:
        assert crd_established(fresh_api, name), name
    core = client.CoreV1Api(fresh_api)
    namespace_status = core.read_namespace(SYSTEM_NAMESPACE).status
    assert namespace_status is not None
    assert namespace_status.phase == "Active"
    core.read_namespaced_service_account("pgwarden", SYSTEM_NAMESPACE)
    service = core.read_namespaced_service("pgwarden-metrics", SYSTEM_NAMESPACE)
    assert service.spec is not None
    assert [p.name for p in service.spec.ports or []] == ["metrics"]
    deployment = client.AppsV1Api(fresh_api).read_namespaced_deployment("pgwarden", SYSTEM_NAMESPACE)
    assert deployment.spec is not None
    assert deployment.spec.template.spec is not None
    assert deployment.spec.template.spec.service_account_name == "pgwarden"
    rbac = client.RbacAuthorizationV1Api(fresh_api)
    binding = rbac.read_cluster_role_binding("pgwarden")
    assert binding.role_ref.kind == "ClusterRole"
    assert binding.role_ref.name == "pgwarden"
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects or []] == [
        ("ServiceAccount", "pgwarden", SYSTEM_NAMESPACE)
    ]
    shipped = documents(MANIFESTS / "rbac" / "clusterrole.yaml")[0]["rules"]
    assert as_dict(rbac.read_cluster_role("pgwarden"))["rules"] == shipped


def test_reapply_changes_nothing(installed: Install) -> None:
    """Applying again changes no object and `kubectl diff` sees no drift: a GitOps tool stays in sync.

    (kubectl itself says "configured" for a PodDisruptionBudget every time: its selector's patch strategy
    is "replace", so kubectl always sends it. The server changes nothing, which is what counts.)
    """
    plane = installed.plane

    def versions() -> dict[tuple[str, str], str]:
        live = yaml.safe_load(plane.kubectl("get", "-k", str(MANIFESTS), "-o", "yaml").stdout)["items"]
        return {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"] for o in live}

    before = versions()
    again = plane.kubectl("apply", "-k", str(MANIFESTS)).stdout.splitlines()
    assert [line for line in again if not line.endswith(" unchanged")] == [
        "poddisruptionbudget.policy/pgwarden configured"
    ]
    assert versions() == before
    diff = plane.kubectl("diff", "-k", str(MANIFESTS), check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_the_operator_pod_passes_the_restricted_pod_security_level(installed: Install, tmp_path: Path) -> None:
    """The namespace enforces `restricted` and the Deployment's pod is admitted by it; a weaker pod is refused."""
    plane = installed.plane
    live = plane.kubectl("get", "deployment/pgwarden", "-n", SYSTEM_NAMESPACE, "-o", "yaml").stdout
    spec = yaml.safe_load(live)["spec"]["template"]["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pss-probe"}, "spec": spec}
    path = tmp_path / "pss-probe.yaml"
    path.write_text(yaml.safe_dump(pod))
    done = plane.kubectl("create", "--dry-run=server", "-n", SYSTEM_NAMESPACE, "-f", str(path), check=False)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # `warn: restricted` would speak up here
    weaker = copy.deepcopy(pod)
    for container in weaker["spec"]["containers"]:
        container["securityContext"]["allowPrivilegeEscalation"] = True
    path.write_text(yaml.safe_dump(weaker))
    refused = plane.kubectl("create", "--dry-run=server", "-n", SYSTEM_NAMESPACE, "-f", str(path), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted' in refused.stderr, refused.stderr


def test_replicas_are_spread_softly_and_guarded_by_a_disruption_budget(installed: Install) -> None:
    """HA that scheduling backs, yet runs on one node: soft spread only, a PDB, ingress only to the served ports."""
    objects = {(o["kind"], o["metadata"]["name"]): o for o in rendered(installed.plane, MANIFESTS)}
    template = objects[("Deployment", "pgwarden")]["spec"]["template"]
    labels = template["metadata"]["labels"]
    spread = template["spec"]["topologySpreadConstraints"]
    assert spread
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)
    assert "podAntiAffinity" not in (template["spec"].get("affinity") or {})
    budget = objects[("PodDisruptionBudget", "pgwarden")]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    netpol = objects[("NetworkPolicy", "pgwarden")]["spec"]
    assert netpol["podSelector"]["matchLabels"].items() <= labels.items()
    assert netpol["policyTypes"] == ["Ingress"]
    (container,) = template["spec"]["containers"]
    served = {p["name"] for p in container["ports"]}
    assert {p["port"] for rule in netpol["ingress"] for p in rule["ports"]} == served == {"metrics", "health"}


def test_servicemonitor_component_selects_the_metrics_service(control_plane: ControlPlane, tmp_path: Path) -> None:
    """The optional component, used the way its comment says, renders a ServiceMonitor for pgwarden-metrics."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only, as a user's overlay beside the checkout would have them
                "resources": [os.path.relpath(MANIFESTS, overlay)],
                "components": [os.path.relpath(MANIFESTS / "components" / "servicemonitor", overlay)],
            }
        )
    )
    objects = rendered(control_plane, overlay)
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "pgwarden-metrics"]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]


# -- examples -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_server(installed: Install, fresh_api: client.ApiClient, path: Path) -> None:
    """Each example passes kubectl's strict validation and the server's admission (dry run, fresh namespace)."""
    text = path.read_text()
    assert text.startswith("# "), f"{path.name}: start with a comment saying what it does, for users"
    namespace = new_namespace(fresh_api, prefix="example")
    done = installed.plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    docs = documents(path)
    assert len(done.stdout.splitlines()) == len(docs), done.stdout
    assert all(line.endswith(" (server dry run)") for line in done.stdout.splitlines()), done.stdout
    for doc in docs:
        if doc["kind"] == "PostgresPolicy":
            parse_spec(doc["spec"])  # the model reads it as the API server does


def test_examples_policies_name_a_secret_the_examples_provide() -> None:
    """Every example policy logs in with credentials an example Secret provides, under the keys it reads."""
    secrets: dict[str, dict[str, Any]] = {}
    policies: list[tuple[str, dict[str, Any]]] = []
    for path in EXAMPLE_FILES:
        for doc in documents(path):
            if doc["kind"] == "Secret":
                secrets[doc["metadata"]["name"]] = doc
            elif doc["kind"] == "PostgresPolicy":
                policies.append((path.name, doc))
    assert {name for name, _ in policies} >= {
        "idle-reaper.yaml",
        "idle-in-transaction.yaml",
        "long-queries.yaml",
        "connection-cap-per-user.yaml",
        "autovacuum-cap.yaml",
        "dry-run.yaml",
        "cloudnativepg-primary.yaml",
    }
    for name, policy in policies:
        ref = policy["spec"]["connection"]["credentialsSecret"]
        secret = secrets[ref["name"]]
        keys = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
        assert {ref.get("usernameKey", "username"), ref.get("passwordKey", "password")} <= keys, name
    (cnpg,) = [p for n, p in policies if n == "cloudnativepg-primary.yaml"]
    assert cnpg["spec"]["selector"]["matchLabels"]["cnpg.io/instanceRole"] == "primary"
    assert secrets[cnpg["spec"]["connection"]["credentialsSecret"]["name"]]["type"] == "kubernetes.io/basic-auth"
    (dry,) = [p for n, p in policies if n == "dry-run.yaml"]
    assert dry["spec"]["enforcementAction"] == "dryRun"


# -- the invalid corpus, through kubectl ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl_refusals(installed: Install, fresh_api: client.ApiClient) -> dict[str, tuple[str, str]]:
    """One `kubectl apply --dry-run=server` of every invalid document: file -> (reason, kubectl's message).

    kubectl goes on after a refused object and prints one `Error from server (<reason>): error when
    creating "<file>": <message>` per refusal, so one run covers the whole corpus.
    """
    namespace = new_namespace(fresh_api, prefix="invalid")
    args = [arg for example in INVALID for arg in ("-f", str(example.path))]
    done = installed.plane.kubectl("apply", "--dry-run=server", "-n", namespace, *args, check=False)
    assert done.returncode != 0
    assert done.stdout == "", f"kubectl accepted some invalid documents:\n{done.stdout}"
    refusals: dict[str, tuple[str, str]] = {}
    for chunk in re.split(r"^(?=Error from server \()", done.stderr, flags=re.MULTILINE):
        match = re.match(r'Error from server \((\w+)\): error when creating "([^"]+)": (.*)', chunk, re.DOTALL)
        if match:
            refusals[Path(match.group(2)).name] = (match.group(1), match.group(3))
    return refusals


@pytest.mark.parametrize("example", INVALID, ids=lambda e: e.name)
def test_kubectl_refuses_invalid_policy_with_its_message(
    kubectl_refusals: dict[str, tuple[str, str]], example: Example
) -> None:
    """As a user sees it: kubectl (strict field validation by default) prints the message the file promises."""
    assert example.name in kubectl_refusals, f"{example.name} was not refused"
    reason, message = kubectl_refusals[example.name]
    assert reason == REFUSAL_REASON[example.expect_code]
    assert example.expect is not None
    assert example.expect in message


# -- PostgreSQL: the role script and the seed's idle reaper, for real ---------------------------------------


@pytest.mark.pg
def test_role_script_creates_a_least_privilege_role(pg_factory: PgFactory, tmp_path: Path) -> None:
    """pgwarden-role.sql runs as documented; its role can signal and read stats, nothing more unless opted in."""
    server = pg_factory(host=next_host())
    major = int(server.major)

    def attributes() -> list[tuple[Any, ...]]:
        return server.execute(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = %s",
            (ROLE,),
        )

    def member_of() -> set[str]:
        rows = server.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s",
            (ROLE,),
        )
        return {row[0] for row in rows}

    def privileges() -> dict[str, bool]:
        (row,) = server.execute(
            "SELECT has_parameter_privilege(%(r)s, 'autovacuum_max_workers', 'ALTER SYSTEM'),"
            " has_function_privilege(%(r)s, 'pg_catalog.pg_reload_conf()', 'EXECUTE'),"
            " has_table_privilege(%(r)s, 'pg_catalog.pg_file_settings', 'SELECT'),"
            " has_function_privilege(%(r)s, 'pg_catalog.pg_show_all_file_settings()', 'EXECUTE'),"
            " has_parameter_privilege(%(r)s, 'shared_preload_libraries', 'ALTER SYSTEM')",
            {"r": ROLE},
        )
        names = ("alter_autovacuum", "reload", "read_file_settings", "show_file_settings", "alter_other")
        return dict(zip(names, row, strict=True))

    run_role_script(server, ROLE_SCRIPT)
    assert attributes() == [(True, False, False, False, False, False)]
    assert member_of() == {"pg_signal_backend", "pg_read_all_stats"}
    assert privileges() == {
        "alter_autovacuum": False,
        "reload": False,
        "read_file_settings": False,
        "show_file_settings": False,
        "alter_other": False,
    }

    server.execute(f"DROP OWNED BY {ROLE}")
    server.execute(f"DROP ROLE {ROLE}")
    run_role_script(server, role_script_with_optional_grants(major, tmp_path / "with-optional.sql"))
    assert attributes() == [(True, False, False, False, False, False)]
    opted = {"pg_signal_autovacuum_worker"} if major >= 18 else set()
    assert member_of() == {"pg_signal_backend", "pg_read_all_stats"} | opted
    assert privileges() == {
        "alter_autovacuum": True,
        "reload": True,
        "read_file_settings": True,
        "show_file_settings": True,
        "alter_other": False,  # ALTER SYSTEM on that one parameter only
    }


@pytest.mark.pg
def test_idle_reaper_example_terminates_idle_sessions(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    pg_factory: PgFactory,
    run_operator: OperatorFactory,
    tmp_path: Path,
) -> None:
    """The seed's example, applied with kubectl: idle sessions go; busy and in-transaction ones stay."""
    server = pg_factory(host=next_host(), hba="password")
    prepare_example_server(server)
    policy = fast_idle_reaper(server.port)
    name = policy["metadata"]["name"]
    create_running_pod(k8s_api, namespace, "db-0", policy["spec"]["selector"]["matchLabels"], server.host)
    doomed, survivors = open_session_mix(server)
    apply_documents(control_plane, namespace, [example_secret()], tmp_path / "secret.yaml")
    run_operator([namespace])
    applied = apply_documents(control_plane, namespace, [copy.deepcopy(policy)], tmp_path / "policy.yaml")
    assert applied.split() == [f"postgrespolicy.pgwarden.dev/{name}", "created"]

    for pid in doomed:
        server.wait_gone(pid, timeout=30)
    wait_for(lambda: terminated_total(k8s_api, namespace, name) >= 3, timeout=30, message="status totals")
    assert terminated_total(k8s_api, namespace, name) == 3
    assert all(server.alive(pid) for pid in survivors)
    stored = get_policy(k8s_api, namespace, name)
    ready = condition(stored, ConditionType.READY)
    assert ready is not None
    assert ready["status"] == "True", stored["status"]
    wait_for(
        lambda: any(e.reason == EventReason.SESSIONS_TERMINATED for e in events(k8s_api, namespace, name)),
        timeout=30,
        message="a SessionsTerminated event",
    )
    # What the user looks at.
    header, row = control_plane.kubectl("get", "pgpolicy", name, "-n", namespace).stdout.splitlines()
    assert header.split()[:5] == ["NAME", "MODE", "TARGETS", "READY", "ACTIONS"]
    assert row.split()[:5] == [name, "enforce", "1", "True", "3"]
