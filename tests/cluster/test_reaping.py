"""pgwarden, as deployed, reaps idle sessions on a PostgreSQL pod of a StatefulSet on the real node.

Everything is real: the PostgreSQL image runs under the kubelet, pgwarden reaches it on its pod IP over
the pod network, reads the credentials Secret with its ServiceAccount token. The test opens sessions
from the host (pods are reachable from this machine) and watches them from there.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from pgwarden.policy.api import CREDENTIALS_LABEL, EventReason
from tests.cluster.conftest import kubectl, kubectl_json
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
SUPERUSER_PASSWORD = "cluster-test-superuser"
ROLE_PASSWORD = "cluster-test-pgwarden"
APP_PASSWORD = "cluster-test-app"
READY_TIMEOUT = 120.0
REAP_TIMEOUT = 120.0


def apply(namespace: str, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input_yaml=yaml.safe_dump_all(docs))


def statefulset(namespace: str) -> list[dict[str, Any]]:
    """A headless Service and a one-pod StatefulSet of localhost/postgres:15, labelled as the example
    policies select (`app: postgres`); data on an emptyDir (a fresh server per test)."""
    labels = {"app": "postgres"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "postgres-superuser", "namespace": namespace},
            "stringData": {"password": SUPERUSER_PASSWORD},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "postgres", "namespace": namespace},
            "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "pg", "port": 5432}]},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "postgres", "namespace": namespace},
            "spec": {
                "serviceName": "postgres",
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "postgres",
                                "image": "localhost/postgres:15",
                                "imagePullPolicy": "Never",
                                "env": [
                                    {
                                        "name": "POSTGRES_PASSWORD",
                                        "valueFrom": {
                                            "secretKeyRef": {"name": "postgres-superuser", "key": "password"}
                                        },
                                    }
                                ],
                                "ports": [{"name": "pg", "containerPort": 5432}],
                                "readinessProbe": {
                                    "exec": {"command": ["pg_isready", "-h", "/var/run/postgresql", "-U", "postgres"]},
                                    "periodSeconds": 2,
                                },
                                "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                            }
                        ],
                        "volumes": [{"name": "data", "emptyDir": {}}],
                    },
                },
            },
        },
    ]


def credentials_secret(namespace: str) -> dict[str, Any]:
    """credentials-secret.yaml with the test's password, labelled as pgwarden requires."""
    secret = yaml.safe_load((EXAMPLES / "credentials-secret.yaml").read_text())
    secret["metadata"]["namespace"] = namespace
    secret["metadata"].setdefault("labels", {})[CREDENTIALS_LABEL] = "true"
    secret["stringData"]["password"] = ROLE_PASSWORD
    return dict(secret)


def fast_idle_reaper(namespace: str) -> dict[str, Any]:
    """idle-reaper.yaml as shipped, with a 2 s stateAge so the test does not wait ten minutes."""
    policy = yaml.safe_load((EXAMPLES / "idle-reaper.yaml").read_text())
    policy["metadata"]["namespace"] = namespace
    (rule,) = policy["spec"]["sessions"]
    rule["stateAge"] = "2s"
    return dict(policy)


def pod_ip(namespace: str) -> str | None:
    pod = kubectl_json("get", "pod", "postgres-0", "-n", namespace)
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return pod["status"].get("podIP") if conditions.get("Ready") == "True" else None


def superuser(host: str) -> psycopg.Connection[Any]:
    return psycopg.connect(host=host, user="postgres", password=SUPERUSER_PASSWORD, dbname="postgres", autocommit=True)


def prepare_server(host: str) -> None:
    """pgwarden-role.sql as its header says, the role's password, and an application role to reap."""
    with superuser(host) as conn:
        conn.execute((EXAMPLES / "pgwarden-role.sql").read_text().encode())
        conn.execute(sql.SQL("ALTER ROLE pgwarden PASSWORD {}").format(sql.Literal(ROLE_PASSWORD)))
        conn.execute(sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(sql.Literal(APP_PASSWORD)))


def alive(host: str, pids: list[int]) -> set[int]:
    """Which of `pids` still have a backend (a short-lived observer connection: never idle for long)."""
    with superuser(host) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchall()
    return {row[0] for row in rows}


@pytest.fixture
def namespace(pgwarden_running: None) -> Iterator[str]:
    name = f"reap-{secrets.token_hex(4)}"
    kubectl("create", "namespace", name)
    yield name
    # Policies first: the operator removes their finalizers; then the namespace, without waiting.
    kubectl("delete", "postgrespolicies", "--all", "-n", name, "--wait=true", "--timeout=60s")
    kubectl("delete", "namespace", name, "--wait=false")


def test_idle_sessions_on_a_statefulset_pod_are_reaped_with_status_and_events(namespace: str) -> None:
    apply(namespace, *statefulset(namespace))
    host = wait_for(lambda: pod_ip(namespace), timeout=READY_TIMEOUT, interval=0.5, message="postgres-0 Ready")
    prepare_server(host)
    connect = {"host": host, "user": "app", "password": APP_PASSWORD, "dbname": "postgres", "autocommit": True}
    doomed = [psycopg.connect(**connect, application_name="web") for _ in range(3)]
    busy = psycopg.connect(**{**connect, "autocommit": False}, application_name="web")
    busy.execute("SELECT 1")  # idle in transaction: not `idle`, so the rule must leave it alone
    try:
        doomed_pids = [conn.info.backend_pid for conn in doomed]
        apply(namespace, credentials_secret(namespace), fast_idle_reaper(namespace))

        wait_for(
            lambda: not alive(host, doomed_pids), timeout=REAP_TIMEOUT, interval=0.5, message="idle sessions reaped"
        )
        assert alive(host, [busy.info.backend_pid]) == {busy.info.backend_pid}

        def terminated() -> dict[str, Any] | None:
            policy = kubectl_json("get", "postgrespolicy", "idle-reaper", "-n", namespace)
            totals = (policy.get("status") or {}).get("totals") or {}
            return policy if totals.get("terminated", 0) >= len(doomed_pids) else None

        policy = wait_for(terminated, timeout=60, interval=0.5, message="status.totals.terminated")
        assert policy["status"]["totals"]["terminated"] == len(doomed_pids)

        def events() -> list[dict[str, Any]]:
            items = kubectl_json(
                "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=idle-reaper"
            )["items"]
            return [e for e in items if e["reason"] == EventReason.SESSIONS_TERMINATED]

        (event, *_) = wait_for(events, timeout=60, interval=0.5, message="a SessionsTerminated Event")
        assert event["type"] == "Normal"
        assert event["involvedObject"]["kind"] == "PostgresPolicy"
    finally:
        busy.close()
        for conn in doomed:
            conn.close()
