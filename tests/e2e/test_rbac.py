"""The controller's RBAC, proven on a real API server: it works with exactly manifests/rbac, and can do no more.

The API server runs with `--authorization-mode=RBAC`. The operator is started as its ServiceAccount
(`pgwarden-system/pgwarden`, a token from the TokenRequest API, as a pod would mount) with the arguments of
manifests/operator/deployment.yaml, i.e. as deployed: `--all-namespaces`, peering through the
ClusterKopfPeering `pgwarden`. End to end it must list and watch policies and pods, read the credentials
Secret by name, terminate idle sessions on a real PostgreSQL server, write status, post Events, write and
delete the policy's openreports Report, add and remove its finalizer, and keep its peering record alive,
with no request refused (kopf logs each 403).

Then what that identity may do is listed with SelfSubjectRulesReview (what `kubectl auth can-i --list`
asks) and compared with EXPECTED, verb by verb: a broader grant (another verb, a wildcard, `list` on
Secrets) fails the test just like a missing one. Rules every authenticated ServiceAccount gets from the
default ClusterRoles are excluded explicitly (DEFAULT_*), and checked to be exactly what an unbound
ServiceAccount gets, so that list cannot hide anything either.

This module has a control plane of its own: the deployed mode is cluster-wide, and on the session's shared
control plane it would enforce the policies other tests left behind, and its ClusterKopfPeering would make
other cluster-wide operators peer with it.

Not covered, by design: `pgwarden run --namespace NS`. It then peers through a `KopfPeering` in NS, which
this ClusterRole does not grant; the operator refuses to start (exit 2, naming the CRD; tests/unit/
test_peering_check.py). See the note in manifests/rbac/clusterrole.yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client

from pgwarden.policy.api import GROUP, PLURAL, VERSION, ConditionType, EventReason
from tests.fixtures.operator import OperatorProcess
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import as_dict, create_running_pod, new_namespace
from tests.harness.manifests import (
    MANIFESTS,
    SYSTEM_NAMESPACE,
    apply_documents,
    example_secret,
    fast_idle_reaper,
    install_manifests,
    open_session_mix,
    prepare_example_server,
)
from tests.harness.openreports import get_report, install_openreports
from tests.harness.pgbinaries import e2e_versions
from tests.harness.policies import condition, events, get_policy, next_host, terminated_total
from tests.harness.postgres import PgServer, running_server, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

SERVICE_ACCOUNT = "pgwarden"
FINALIZER = "pgwarden.dev/finalizer"
PEERING = "pgwarden"
# RBAC does not depend on the PostgreSQL version: one server of the newest selected major. Not the
# session's pg_major parameter, which would make pytest regroup this module's tests by version and start
# its control plane once per group.
PG_MAJOR = max(e2e_versions(), key=int)

Rule = tuple[str, str, str, str]  # (apiGroup, resource, verb, resourceName or "" for any name)

# Exactly what manifests/rbac/clusterrole.yaml must grant, and why (the file says the same per rule).
EXPECTED: frozenset[Rule] = frozenset(
    {
        # kopf lists then watches policies; the status writer re-reads one by name after a conflict.
        ("pgwarden.dev", "postgrespolicies", "get", ""),
        ("pgwarden.dev", "postgrespolicies", "list", ""),
        ("pgwarden.dev", "postgrespolicies", "watch", ""),
        # Finalizer and kopf's progress annotations. Never create, update or delete.
        ("pgwarden.dev", "postgrespolicies", "patch", ""),
        # The status writer's merge patch (status is read through the object, so no get here).
        ("pgwarden.dev", "postgrespolicies/status", "patch", ""),
        # The pods index: labels, phase and IP of every pod; one pod by name to confirm its IP before acting.
        ("", "pods", "get", ""),
        ("", "pods", "list", ""),
        ("", "pods", "watch", ""),
        # The credentials Secret a policy names, by name only: never list or watch.
        ("", "secrets", "get", ""),
        # One Event per target per cycle that acted.
        ("", "events", "create", ""),
        # Policy reports: the Report of each policy read once, written when it changes, deleted with the policy.
        ("openreports.io", "reports", "get", ""),
        ("openreports.io", "reports", "create", ""),
        ("openreports.io", "reports", "patch", ""),
        ("openreports.io", "reports", "delete", ""),
        # kopf's peering: watch every ClusterKopfPeering (kopf cannot narrow the watch), patch ours only.
        ("kopf.dev", "clusterkopfpeerings", "list", ""),
        ("kopf.dev", "clusterkopfpeerings", "watch", ""),
        # The operator creates the peering object "pgwarden" at start-up if missing (create takes no name).
        ("kopf.dev", "clusterkopfpeerings", "create", ""),
        ("kopf.dev", "clusterkopfpeerings", "patch", PEERING),
    }
)

# What every authenticated ServiceAccount may do without any grant of ours, from the default ClusterRoles
# the API server creates and binds to system:authenticated or system:serviceaccounts:
DEFAULT_RESOURCE_RULES: frozenset[Rule] = frozenset(
    {
        # system:basic-user: ask what it may do (kubectl auth can-i, whoami).
        ("authorization.k8s.io", "selfsubjectaccessreviews", "create", ""),
        ("authorization.k8s.io", "selfsubjectrulesreviews", "create", ""),
        ("authentication.k8s.io", "selfsubjectreviews", "create", ""),
        # system:cluster-trust-bundle-discovery: read the cluster's public CA bundles.
        ("certificates.k8s.io", "clustertrustbundles", "get", ""),
        ("certificates.k8s.io", "clustertrustbundles", "list", ""),
        ("certificates.k8s.io", "clustertrustbundles", "watch", ""),
    }
)
DEFAULT_NON_RESOURCE_RULES: frozenset[tuple[str, str]] = frozenset(
    {
        # system:discovery and system:public-info-viewer: API discovery, health and version.
        *((url, "get") for url in ("/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*")),
        *((url, "get") for url in ("/healthz", "/livez", "/readyz", "/version", "/version/")),
        # system:service-account-issuer-discovery: the token issuer's public keys.
        *((url, "get") for url in ("/.well-known/openid-configuration", "/.well-known/openid-configuration/")),
        *((url, "get") for url in ("/openid/v1/jwks", "/openid/v1/jwks/")),
    }
)

# (verb, resource, allowed) as `kubectl auth can-i` asks them; the "no"s are the grants that must never creep in.
CAN_I = [
    ("list", "secrets", False),
    ("watch", "secrets", False),
    ("get", "secrets", True),
    ("delete", "postgrespolicies.pgwarden.dev", False),
    ("update", "postgrespolicies.pgwarden.dev", False),
    ("create", "postgrespolicies.pgwarden.dev", False),
    ("patch", "postgrespolicies.pgwarden.dev", True),
    ("update", "pods", False),
    ("patch", "pods", False),
    ("delete", "pods", False),
    ("get", "pods", True),
    ("list", "pods", True),
    ("delete", "events", False),
    ("create", "events", True),
    ("create", "clusterkopfpeerings.kopf.dev", True),
    ("delete", "clusterkopfpeerings.kopf.dev", False),
    ("list", "kopfpeerings.kopf.dev", False),
    ("patch", "reports.openreports.io", True),
    ("list", "reports.openreports.io", False),
    ("delete", "clusterreports.openreports.io", False),
    ("create", "serviceaccounts/token", False),
    ("impersonate", "serviceaccounts", False),
]


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    """A control plane of this module's own with manifests/ installed, as on a real cluster, and the openreports
    CRDs (policy reports are on where they are installed: their grants are exercised too)."""
    with ControlPlane() as plane:
        install_manifests(plane)
        with plane.api_client() as api:
            install_openreports(api)
        yield plane


@pytest.fixture(scope="module")
def admin(cluster: ControlPlane) -> Iterator[client.ApiClient]:
    with cluster.api_client() as api:
        yield api


@pytest.fixture(scope="module")
def token(cluster: ControlPlane, admin: client.ApiClient) -> str:
    """A TokenRequest token for the operator's ServiceAccount, once its ClusterRole is in force.

    The API server's authorizer learns about new RBAC objects from a watch: right after the install
    it may still refuse. Waiting here keeps a 403 in the operator's log meaning a missing grant.
    """
    client.CoreV1Api(admin).read_namespaced_service_account(SERVICE_ACCOUNT, SYSTEM_NAMESPACE)
    token = cluster.token_for(SYSTEM_NAMESPACE, SERVICE_ACCOUNT)
    with cluster.api_client(token=token) as api:
        wait_for(lambda: rules_review(api, "default")[0] >= EXPECTED, timeout=30, message="the ClusterRole in force")
    return token


@pytest.fixture(scope="module")
def operator_kubeconfig(cluster: ControlPlane, token: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cluster.kubeconfig_for_token(token, tmp_path_factory.mktemp("rbac") / "pgwarden.kubeconfig")


@pytest.fixture
def as_operator(cluster: ControlPlane, token: str) -> Iterator[client.ApiClient]:
    with cluster.api_client(token=token) as api:
        yield api


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    with running_server(PG_MAJOR, host=next_host(), hba="password") as server:
        yield server


@pytest.fixture
def operators(tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """Operators a test started: stopped at teardown, their logs shown if the test failed."""
    started: list[OperatorProcess] = []
    yield started
    for proc in started:
        proc.stop()
        print(f"--- operator log {proc.log_path} ---\n{proc.logs()[-8000:]}")


# -- helpers ----------------------------------------------------------------------------------------------


def deployed_args() -> list[str]:
    """The Deployment's arguments, minus the ports (each test process gets free ones)."""
    deployment = yaml.safe_load((MANIFESTS / "operator" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = [a for a in container["args"] if not a.startswith(("--metrics-port", "--health-port"))]
    assert "--all-namespaces" in args, "the deployed mode changed: revisit EXPECTED and this module"
    return list(args)


def deployed_uid() -> int:
    """The Deployment's runAsUser: the image's numeric user, which has no passwd entry in the image."""
    deployment = yaml.safe_load((MANIFESTS / "operator" / "deployment.yaml").read_text())
    return int(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])


def start_operator(kubeconfig: Path, logdir: Path, started: list[OperatorProcess]) -> OperatorProcess:
    """`pgwarden run` as deployed: its arguments, its numeric user, POD_NAME from the downward API."""
    proc = OperatorProcess(
        kubeconfig, [], logdir, extra=deployed_args(), run_as=deployed_uid(), env={"POD_NAME": "pgwarden-5c7d-x2x4q"}
    )
    started.append(proc)
    wait_for(lambda: proc.healthy() or proc.proc.poll() is not None, timeout=60, message="operator healthz")
    assert proc.proc.poll() is None, f"operator exited with {proc.proc.returncode}:\n{proc.logs()[-5000:]}"
    return proc


def rules_review(api: client.ApiClient, namespace: str) -> tuple[set[Rule], set[tuple[str, str]]]:
    """What the caller may do in `namespace` (cluster-wide grants included), one tuple per verb."""
    review = client.AuthorizationV1Api(api).create_self_subject_rules_review(
        client.V1SelfSubjectRulesReview(spec=client.V1SelfSubjectRulesReviewSpec(namespace=namespace))
    )
    status = as_dict(review)["status"]
    assert not status.get("incomplete"), status.get("evaluationError")
    resource: set[Rule] = set()
    for rule in status.get("resourceRules") or []:
        # A field left out would mean "any"; "*" makes it show up as unexpected rather than vanish.
        for group in rule.get("apiGroups") or ["*"]:
            for res in rule.get("resources") or ["*"]:
                for verb in rule.get("verbs") or ["*"]:
                    for name in rule.get("resourceNames") or [""]:
                        resource.add((group, res, verb, name))
    non_resource = {
        (url, verb)
        for rule in status.get("nonResourceRules") or []
        for url in rule.get("nonResourceURLs") or ["*"]
        for verb in rule.get("verbs") or ["*"]
    }
    return resource, non_resource


def forbidden(call: Callable[[], object]) -> bool:
    try:
        call()
    except client.ApiException as error:
        return bool(error.status == 403)
    return False


def peering_records(api: client.ApiClient) -> dict[str, Any]:
    obj = client.CustomObjectsApi(api).get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", PEERING)
    return dict(cast(dict[str, Any], obj).get("status") or {})


# -- tests ------------------------------------------------------------------------------------------------


def test_service_account_may_do_exactly_what_the_operator_needs(
    cluster: ControlPlane, admin: client.ApiClient, as_operator: client.ApiClient, operator_kubeconfig: Path
) -> None:
    """SelfSubjectRulesReview as the operator: EXPECTED plus the defaults every ServiceAccount has, nothing else."""
    namespace = new_namespace(admin, prefix="rbac")
    # The defaults, as an unbound ServiceAccount sees them: the exclusions below hide nothing of ours.
    with cluster.api_client(token=cluster.token_for(namespace, "nobody")) as nobody:
        assert rules_review(nobody, namespace) == (set(DEFAULT_RESOURCE_RULES), set(DEFAULT_NON_RESOURCE_RULES))

    resource, non_resource = rules_review(as_operator, namespace)
    listing = cluster.kubectl("auth", "can-i", "--list", "-n", namespace, kubeconfig=operator_kubeconfig)
    assert non_resource == DEFAULT_NON_RESOURCE_RULES
    extra = resource - EXPECTED - DEFAULT_RESOURCE_RULES
    missing = EXPECTED - resource
    assert not extra, f"broader than expected: {sorted(extra)}\n{listing.stdout}"
    assert not missing, f"missing: {sorted(missing)}\n{listing.stdout}"


@pytest.mark.parametrize(("verb", "resource", "allowed"), CAN_I, ids=[f"{v}-{r}" for v, r, _ in CAN_I])
def test_kubectl_auth_can_i_as_the_operator(
    cluster: ControlPlane, operator_kubeconfig: Path, verb: str, resource: str, allowed: bool
) -> None:
    """What a reviewer would ask, with the operator's own token: `kubectl auth can-i VERB RESOURCE -n NS`."""
    answer = cluster.kubectl(
        "auth", "can-i", verb, resource, "-n", "default", kubeconfig=operator_kubeconfig, check=False
    )
    assert answer.stdout.strip() == ("yes" if allowed else "no"), answer.stdout + answer.stderr
    assert answer.returncode == (0 if allowed else 1)


def test_refused_requests_are_refused_for_real(admin: client.ApiClient, as_operator: client.ApiClient) -> None:
    """Not only the reviews: the API server answers 403 to listing Secrets, deleting a policy, updating a pod."""
    namespace = new_namespace(admin, prefix="rbac")
    # Real objects, selecting nothing (the operator of the next test watches every namespace).
    create_running_pod(admin, namespace, "db-0", {"app": "bystander"}, "127.0.0.1")
    policy = fast_idle_reaper(5432)
    policy["spec"]["selector"] = {"matchLabels": {"app": "nothing-here"}}
    client.CustomObjectsApi(admin).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, policy)
    core = client.CoreV1Api(as_operator)
    custom = client.CustomObjectsApi(as_operator)
    name = policy["metadata"]["name"]
    assert forbidden(lambda: core.list_namespaced_secret(namespace))
    assert forbidden(lambda: core.list_secret_for_all_namespaces())
    assert forbidden(
        lambda: custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, dry_run="All")
    )
    pod = client.CoreV1Api(admin).read_namespaced_pod("db-0", namespace)
    assert forbidden(lambda: core.replace_namespaced_pod("db-0", namespace, pod, dry_run="All"))
    # ...while what it does need answers.
    assert core.list_pod_for_all_namespaces().items
    assert cast(dict[str, Any], custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"]


def test_operator_enforces_as_its_service_account_as_deployed(
    cluster: ControlPlane,
    admin: client.ApiClient,
    operator_kubeconfig: Path,
    pg_server: PgServer,
    operators: list[OperatorProcess],
    tmp_path: Path,
) -> None:
    """The Deployment's mode and identity, end to end: sessions reaped, status, Events, finalizer, peering, no 403."""
    server = pg_server
    prepare_example_server(server)
    namespace = new_namespace(admin, prefix="rbac")
    policy = fast_idle_reaper(server.port)
    name = policy["metadata"]["name"]
    apply_documents(cluster, namespace, [example_secret()], tmp_path / "secret.yaml")
    create_running_pod(admin, namespace, "db-0", policy["spec"]["selector"]["matchLabels"], server.host)
    doomed, survivors = open_session_mix(server)
    operator = start_operator(operator_kubeconfig, tmp_path, operators)
    apply_documents(cluster, namespace, [policy], tmp_path / "policy.yaml")

    # Secrets get (the credentials), pods list/watch (the target), policies list/watch: it acted.
    for pid in doomed:
        server.wait_gone(pid, timeout=30)
    assert all(server.alive(pid) for pid in survivors)
    # postgrespolicies/status patch.
    wait_for(lambda: terminated_total(admin, namespace, name) >= 3, timeout=30, message="status totals")
    stored = get_policy(admin, namespace, name)
    ready = condition(stored, ConditionType.READY)
    assert ready is not None
    assert ready["status"] == "True", stored["status"]
    assert [t["pod"] for t in stored["status"]["targets"]] == ["db-0"]
    # postgrespolicies patch: kopf's finalizer (its daemons always carry one).
    assert FINALIZER in stored["metadata"].get("finalizers", [])
    # events create.
    wait_for(
        lambda: any(e.reason == EventReason.SESSIONS_TERMINATED for e in events(admin, namespace, name)),
        timeout=30,
        message="a SessionsTerminated event",
    )
    # reports get/create/patch: the policy's Report, with the target's verdict.
    report = wait_for(lambda: get_report(admin, namespace, name), timeout=30, message="the policy's openreports Report")
    assert [r["resources"][0]["name"] for r in report["results"]] == ["db-0"]
    # clusterkopfpeerings list/watch/patch: its record is in the ClusterKopfPeering, and it is not paused.
    records = wait_for(lambda: peering_records(admin), timeout=30, message="the operator's peering record")
    assert len(records) == 1, records

    # Deleting the policy: kopf stops the daemon and removes the finalizer (patch again).
    client.CustomObjectsApi(admin).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def deleted() -> bool:
        try:
            get_policy(admin, namespace, name)
        except client.ApiException as error:
            return bool(error.status == 404)
        return False

    wait_for(deleted, timeout=30, message="the policy and its finalizer to go")
    # reports delete: the Report goes with its policy.
    wait_for(lambda: get_report(admin, namespace, name) is None, timeout=30, message="the Report to go")
    logs = operator.logs()
    assert "forbidden" not in logs.lower(), "the operator was refused something (see its log)"
    assert "'code': 403" not in logs
