"""The Zalando example (manifests/sidecar/examples/zalando-postgresql.yaml) against Zalando's own CRD, its RBAC
and its PostgreSQL grants, on the real API server and a real PostgreSQL server.

Zalando's `postgresql` CRD is a pinned copy (tests/data/zalando/SOURCE.md). Proves:
- every document of the example is accepted with strict field validation (what `kubectl apply` does by
  default: an unknown field is an error, not a silently pruned value), and the server stored every field
  we sent, unchanged; fields Zalando does not have (the example's old `args`, `securityContext`,
  `serviceAccountName`) are refused;
- after what the README says (`kubectl apply -k manifests/sidecar`, then the example), the ServiceAccount
  Zalando runs its pods as (`postgres-pod`) may do exactly what the sidecar needs in that namespace:
  SubjectAccessReview per need, and its whole rules review compared with an unbound account's;
- the role `users:` creates (LOGIN, nothing else), once the example's Job ran its statement, lets a
  sidecar started as `postgres-pod` with the example's libpq environment enforce for real.

Not covered here (needs a running Zalando operator and Spilo): that the operator renders the sidecar as
we expect, that it creates the role and its Secret, that Spilo's pg_hba.conf accepts the password on
127.0.0.1, and that the Job reaches the master Service over TLS. Those are read from Zalando's and
Spilo's sources, not tested.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client

from pgwarden.policy.api import ConditionType, EventReason
from tests.fixtures.operator import SidecarProcess, apply_crd_file, delete_crds
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import create_running_pod, new_namespace
from tests.harness.manifests import MANIFESTS, documents
from tests.harness.policies import (
    PASSWORD,
    condition,
    create_policy,
    events,
    get_policy,
    next_host,
    open_app_sessions,
    policy_body,
)
from tests.harness.postgres import PgServer, wait_for

pytestmark = [pytest.mark.k8s]

REPO = Path(__file__).resolve().parents[2]
ZALANDO_CRD = REPO / "tests" / "data" / "zalando" / "postgresql.crd.yaml"
EXAMPLE = MANIFESTS / "sidecar" / "examples" / "zalando-postgresql.yaml"
GROUP, VERSION, PLURAL, CRD_NAME = "acid.zalan.do", "v1", "postgresqls", "postgresqls.acid.zalan.do"
# Zalando's pod_service_account_name default: every pod of every cluster runs as it.
POD_SERVICE_ACCOUNT = "postgres-pod"

Need = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# What the sidecar does on the API (pgwarden.sidecar.app), and so what manifests/sidecar/role.yaml grants.
NEEDED: frozenset[Need] = frozenset(
    {
        ("", "pods", "get"),  # its own pod: labels select policies, the annotation hands it the pod
        ("pgwarden.dev", "postgrespolicies", "list"),  # the namespace's policies, every few seconds
        ("pgwarden.dev", "postgrespolicies", "get"),
        ("pgwarden.dev", "postgrespolicies/status", "get"),  # its entry in status.targets, read-modify-write
        ("pgwarden.dev", "postgrespolicies/status", "patch"),
        ("", "events", "create"),  # one Event per cycle that acted
    }
)
# What it must not get from us (Zalando's own postgres-pod ClusterRole grants Patroni more on pods).
NEVER: tuple[Need, ...] = (
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "pods", "delete"),
    ("", "pods", "create"),
    ("pgwarden.dev", "postgrespolicies", "create"),
    ("pgwarden.dev", "postgrespolicies", "delete"),
    ("pgwarden.dev", "postgrespolicies", "patch"),
    ("pgwarden.dev", "postgrespolicies", "update"),
    ("pgwarden.dev", "postgrespolicies", "watch"),
    ("", "events", "delete"),
    ("", "serviceaccounts/token", "create"),
    ("rbac.authorization.k8s.io", "rolebindings", "create"),
)


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zalando_crd(k8s_api: client.ApiClient) -> Iterator[None]:
    """Zalando's CRD on the session's control plane for this module only."""
    apply_crd_file(k8s_api, ZALANDO_CRD)
    wait_for(lambda: served(k8s_api), timeout=30, message="postgresqls to be served")
    yield
    delete_crds(k8s_api, [CRD_NAME])


# -- helpers ----------------------------------------------------------------------------------------------


def served(api: client.ApiClient) -> bool:
    try:
        client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    except client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def example_doc(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(EXAMPLE) if d["kind"] == kind]
    return doc


def not_stored(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Paths of what we sent that the server did not store as sent (pruned or changed). Defaults the
    server added are not differences: only our fields count."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [path or "."]
        return [p for key, value in sent.items() for p in not_stored(value, stored.get(key), f"{path}.{key}")]
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, stored, strict=True)) for p in not_stored(a, b, f"{path}[{i}]")]
    return [] if sent == stored else [path]


def kubectl_get(plane: ControlPlane, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    resource = f"{doc['kind'].lower()}.{doc['apiVersion'].split('/')[0]}" if "/" in doc["apiVersion"] else doc["kind"]
    out = plane.kubectl("get", "-n", namespace, resource, doc["metadata"]["name"], "-o", "json").stdout
    return cast(dict[str, Any], json.loads(out))


def apply_as_the_readme_says(plane: ControlPlane, namespace: str) -> None:
    """manifests/sidecar into the namespace, then the example, both with strict field validation."""
    plane.kubectl("apply", "--validate=strict", "-k", str(MANIFESTS / "sidecar"), "-n", namespace)
    plane.kubectl("apply", "--validate=strict", "-f", str(EXAMPLE), "-n", namespace)


def access_review(api: client.ApiClient, namespace: str, user_namespace: str, need: Need) -> bool:
    """SubjectAccessReview: may `postgres-pod` of `user_namespace` do `need` in `namespace`?"""
    group, resource, verb = need
    resource, _, subresource = resource.partition("/")
    attributes = client.V1ResourceAttributes(
        namespace=namespace, group=group, resource=resource, subresource=subresource or None, verb=verb
    )
    spec = client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{user_namespace}:{POD_SERVICE_ACCOUNT}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{user_namespace}", "system:authenticated"],
        resource_attributes=attributes,
    )
    review = client.AuthorizationV1Api(api).create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
    return review.status is not None and bool(review.status.allowed)


def namespaced_rules(api: client.ApiClient, namespace: str) -> set[Need]:
    """SelfSubjectRulesReview (`kubectl auth can-i --list`), one tuple per verb; "*" stays visible."""
    review = client.AuthorizationV1Api(api).create_self_subject_rules_review(
        client.V1SelfSubjectRulesReview(spec=client.V1SelfSubjectRulesReviewSpec(namespace=namespace))
    )
    assert review.status is not None
    assert not review.status.incomplete, review.status.evaluation_error
    return {
        (group, resource, verb)
        for rule in review.status.resource_rules or []
        for group in rule.api_groups or ["*"]
        for resource in rule.resources or ["*"]
        for verb in rule.verbs or ["*"]
    }


def kubelet_env(api: client.ApiClient, namespace: str, pod: str, env: list[dict[str, Any]]) -> dict[str, str]:
    """The container environment as the kubelet builds it: values, the downward API, Secret keys."""
    resolved: dict[str, str] = {}
    for var in env:
        source = var.get("valueFrom") or {}
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            resolved[var["name"]] = {"metadata.name": pod, "metadata.namespace": namespace}[field]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = client.CoreV1Api(api).read_namespaced_secret(ref["name"], namespace)
            resolved[var["name"]] = base64.b64decode((secret.data or {})[ref["key"]]).decode()
        else:
            resolved[var["name"]] = var["value"]
    return resolved


def zalando_user_secret(api: client.ApiClient, namespace: str, user: str, cluster: str, password: str) -> None:
    """The Secret Zalando writes for a manifest user: <user>.<cluster>.credentials.postgresql.acid.zalan.do."""
    name = f"{user}.{cluster}.credentials.postgresql.acid.zalan.do"
    fields = {"username": user, "password": password}
    data: dict[str, bytes | str] = {k: base64.b64encode(v.encode()).decode() for k, v in fields.items()}
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), data=data)
    client.CoreV1Api(api).create_namespaced_secret(namespace, body)


def run_grant_job(server: PgServer) -> subprocess.CompletedProcess[str]:
    """The example Job's container command, run with the server's psql as the superuser.

    Only the connection differs from the Job: the test server's socket instead of the master Service over
    TLS (the Job's PGHOST/PGSSLMODE); its PGDATABASE is kept, and its command is run as written.
    """
    (container,) = example_doc("Job")["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    assert env.pop("PGHOST") == "acid-orders"
    assert env.pop("PGSSLMODE") == "require"
    command = list(container["command"])
    assert command[0] == "psql"
    env |= {"PGHOST": str(server.socket_dir), "PGPORT": str(server.port), "PGUSER": "postgres"}
    return subprocess.run(
        [str(server.bindir / "psql"), *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def memberships(server: PgServer, role: str) -> set[str]:
    with server.connect() as conn:
        rows = conn.execute(
            "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
            " JOIN pg_roles b ON b.oid = m.roleid WHERE r.rolname = %s",
            (role,),
        ).fetchall()
    return {str(row[0]) for row in rows}


# -- tests ------------------------------------------------------------------------------------------------


def test_example_is_valid_against_zalandos_crd_and_stored_as_sent(
    control_plane: ControlPlane, k8s_api: client.ApiClient, namespace: str, zalando_crd: None
) -> None:
    """Server-side dry run and a real create, fieldValidation=Strict; the server keeps every field we sent."""
    custom = client.CustomObjectsApi(k8s_api)
    sent = example_doc("postgresql")
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sent, dry_run="All", field_validation="Strict"
    )
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sent, field_validation="Strict")
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sent["metadata"]["name"])
    assert not_stored(sent["spec"], cast(dict[str, Any], stored)["spec"]) == []

    # The whole file as a user applies it (kubectl's default is strict); every document stored as sent.
    elsewhere = new_namespace(k8s_api, prefix="zalando")
    dry = control_plane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(EXAMPLE), "-n", elsewhere)
    assert "Warning" not in dry.stderr, dry.stderr
    apply_as_the_readme_says(control_plane, elsewhere)
    for doc in documents(EXAMPLE):
        got = kubectl_get(control_plane, elsewhere, doc)
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        assert not_stored(body, got) == [], doc["kind"]


def test_fields_zalando_does_not_have_are_refused(k8s_api: client.ApiClient, namespace: str, zalando_crd: None) -> None:
    """What the example used to carry fails a strict create, naming each field: the check above can fail."""
    body = example_doc("postgresql")
    body["spec"]["serviceAccountName"] = "pgwarden-sidecar"
    body["spec"]["sidecars"][0]["args"] = ["--metrics-port=9090"]
    body["spec"]["sidecars"][0]["securityContext"] = {"runAsNonRoot": True}
    with pytest.raises(client.ApiException) as refused:
        client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All", field_validation="Strict"
        )
    message = str(refused.value.body)
    for field in ("spec.serviceAccountName", "spec.sidecars[0].args", "spec.sidecars[0].securityContext"):
        assert f'unknown field \\"{field}\\"' in message or f'unknown field "{field}"' in message, message


def test_zalandos_pod_service_account_may_do_exactly_what_the_sidecar_needs(
    control_plane: ControlPlane, k8s_api: client.ApiClient, zalando_crd: None
) -> None:
    """After the README's two applies, `postgres-pod` may do NEEDED in its namespace, nothing more of ours."""
    namespace = new_namespace(k8s_api, prefix="zalando")
    other = new_namespace(k8s_api, prefix="zalando")
    apply_as_the_readme_says(control_plane, namespace)
    # Zalando creates the ServiceAccount with the cluster; token_for creates it the same way (name only).
    token = control_plane.token_for(namespace, POD_SERVICE_ACCOUNT)
    # The authorizer learns new bindings from a watch: wait for the first grant before judging any.
    wait_for(
        lambda: access_review(k8s_api, namespace, namespace, ("", "events", "create")),
        timeout=30,
        message="the RoleBinding in force",
    )
    denied = sorted(need for need in NEEDED if not access_review(k8s_api, namespace, namespace, need))
    assert denied == [], f"postgres-pod lacks what the sidecar needs: {denied}"
    granted = sorted(need for need in NEVER if access_review(k8s_api, namespace, namespace, need))
    assert granted == [], f"postgres-pod may do more than the sidecar needs: {granted}"
    elsewhere = sorted(need for need in NEEDED if access_review(k8s_api, other, namespace, need))
    assert elsewhere == [], f"the grant reaches another namespace: {elsewhere}"

    # Exactly: everything it may do, less what any ServiceAccount may do without a grant, is NEEDED.
    with control_plane.api_client(token=token) as as_pod:
        rules = namespaced_rules(as_pod, namespace)
    with control_plane.api_client(token=control_plane.token_for(namespace, "nobody")) as nobody:
        defaults = namespaced_rules(nobody, namespace)
    assert rules - defaults == set(NEEDED)


@pytest.mark.pg
def test_a_sidecar_as_zalandos_pod_enforces_with_the_examples_role_and_grants(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    zalando_crd: None,
    pg_factory: Any,
    run_sidecar: Any,
    tmp_path: Path,
) -> None:
    """The role as `users:` makes it, the Job's GRANT, `postgres-pod`'s token, the example's env: it enforces."""
    server: PgServer = pg_factory(host=next_host(), hba="password")
    # What Zalando does for `users: {pgwarden: []}`: a LOGIN role with a generated password, nothing else.
    server.create_role("pgwarden", password=PASSWORD)
    server.create_role("app", password=PASSWORD)
    assert memberships(server, "pgwarden") == set()
    for _ in range(2):  # a Job may run again (a retry after a lost answer): the GRANT must not fail then
        result = run_grant_job(server)
        assert result.returncode == 0, result.stderr
    assert memberships(server, "pgwarden") == {"pg_signal_backend", "pg_read_all_stats"}

    namespace = new_namespace(k8s_api, prefix="zalando")
    apply_as_the_readme_says(control_plane, namespace)
    cluster = example_doc("postgresql")
    cluster_name = cluster["metadata"]["name"]
    zalando_user_secret(k8s_api, namespace, "pgwarden", cluster_name, PASSWORD)
    pod = f"{cluster_name}-0"
    # Labels Zalando puts on its pods (cluster_labels, cluster_name_label, the role label Patroni keeps).
    labels = {"application": "spilo", "cluster-name": cluster_name, "spilo-role": "master"}
    create_running_pod(k8s_api, namespace, pod, labels, server.host, annotations=cluster["spec"]["podAnnotations"])

    (sidecar,) = cluster["spec"]["sidecars"]
    env = kubelet_env(k8s_api, namespace, pod, sidecar["env"])
    # SidecarProcess sets these two itself, to the same values.
    assert (env.pop("POD_NAME"), env.pop("POD_NAMESPACE")) == (pod, namespace)
    # The one change: this server listens on its own address and port, not Spilo's 127.0.0.1:5432.
    assert env["PGHOST"] == "127.0.0.1"
    env |= {"PGHOST": server.host, "PGPORT": str(server.port), "PGWARDEN_HANDOVER_GRACE": "3"}
    assert sidecar["command"][:2] == ["pgwarden", "sidecar"]

    policy = policy_body("reaper", server.port, selector={"matchLabels": {"cluster-name": cluster_name}})
    create_policy(k8s_api, namespace, policy)
    doomed = open_app_sessions(server, 2)
    kubeconfig = control_plane.kubeconfig_for_token(
        control_plane.token_for(namespace, POD_SERVICE_ACCOUNT), tmp_path / "postgres-pod.kubeconfig"
    )
    process: SidecarProcess = run_sidecar(kubeconfig, namespace, pod, "", env=env)

    for pid in doomed:
        server.wait_gone(pid, timeout=30)

    def reported() -> dict[str, Any] | None:
        stored = get_policy(k8s_api, namespace, "reaper")
        targets = (stored.get("status") or {}).get("targets") or []
        ready = condition(stored, ConditionType.READY)
        done = [t for t in targets if t["pod"] == pod and t.get("lastActions")]
        return stored if done and ready is not None and ready["status"] == "True" else None

    stored = wait_for(reported, timeout=30, message="the sidecar's entry in status, Ready")
    (target,) = stored["status"]["targets"]
    assert target["enforcer"] == "sidecar", target
    assert not target.get("error"), target
    assert stored["status"]["totals"]["terminated"] == 2
    wait_for(
        lambda: any(e.reason == EventReason.SESSIONS_TERMINATED for e in events(k8s_api, namespace, "reaper")),
        timeout=30,
        message="a SessionsTerminated Event",
    )
    logs = process.logs()
    # An API refusal as the kubernetes client and kopf print it; not a bare "403", which a timestamp's
    # microseconds can hold (12:10:58.403066).
    assert not re.search(r"\(403\)|\b403 Forbidden|status\W+403\b", logs), logs[-3000:]
    assert "forbidden" not in logs.lower(), logs[-3000:]
