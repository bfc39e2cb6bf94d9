"""A PostgreSQL StatefulSet pod on the real node, set up as the examples say, and sessions on it.

Shared by the reaping and HA tests: localhost/postgres:15 under the kubelet, the `pgwarden` role from
pgwarden-role.sql, the credentials Secret and the idle-reaper example. Sessions are opened from the host
(pods are reachable from this machine) and watched from there with short-lived connections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from pgwarden.policy.api import CREDENTIALS_LABEL
from tests.cluster.conftest import kubectl, kubectl_json
from tests.harness.postgres import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
SUPERUSER_PASSWORD = "cluster-test-superuser"
ROLE_PASSWORD = "cluster-test-pgwarden"
APP_PASSWORD = "cluster-test-app"
READY_TIMEOUT = 120.0
REAP_TIMEOUT = 120.0


def apply(namespace: str, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input_yaml=yaml.safe_dump_all(docs))


def statefulset(namespace: str, major: str) -> list[dict[str, Any]]:
    """A headless Service and a one-pod StatefulSet of localhost/postgres:<major>, labelled as the example
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
                                "image": f"localhost/postgres:{major}",
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
    """postgres-0's IP once Ready; None while the StatefulSet controller has not created the pod yet."""
    found = kubectl("get", "pod", "postgres-0", "-n", namespace, "-o", "json", check=False)
    if found.returncode != 0 and "NotFound" in found.stderr:
        return None
    if found.returncode != 0:
        raise AssertionError(f"kubectl get pod postgres-0 failed ({found.returncode}): {found.stderr}")
    pod = json.loads(found.stdout)
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


def start_postgres(namespace: str, major: str = "15") -> str:
    """The StatefulSet's pod Ready and prepared; returns its pod IP."""
    apply(namespace, *statefulset(namespace, major))
    host = wait_for(lambda: pod_ip(namespace), timeout=READY_TIMEOUT, interval=0.5, message="postgres-0 Ready")
    prepare_server(host)
    return str(host)


def open_idle(host: str, count: int) -> list[psycopg.Connection[Any]]:
    """`count` idle application sessions (autocommit: state `idle`, what the idle-reaper rule selects)."""
    return [
        psycopg.connect(
            host=host, user="app", password=APP_PASSWORD, dbname="postgres", autocommit=True, application_name="web"
        )
        for _ in range(count)
    ]


def pids(connections: list[psycopg.Connection[Any]]) -> list[int]:
    return [conn.info.backend_pid for conn in connections]


def policy_totals(namespace: str, name: str = "idle-reaper") -> dict[str, Any]:
    policy = kubectl_json("get", "postgrespolicy", name, "-n", namespace)
    return dict((policy.get("status") or {}).get("totals") or {})


CLIENT_POD = "client"
CLIENT_APP = "web"  # the application name idle-reaper.yaml's rule selects


def client_pod(namespace: str, server: str, count: int) -> dict[str, Any]:
    """A pod holding `count` idle sessions to `server`, as an application would: one psql each, waiting on a
    stdin that never speaks, so its session stays `idle`. localhost/postgres:15 brings psql (a 15 client
    speaks to 18 as well); restricted-level security context."""
    script = f"for i in $(seq {count}); do sleep 2147483647 | psql -X -q & done; wait"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": CLIENT_POD, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "psql",
                    "image": "localhost/postgres:15",
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", script],
                    "env": [
                        {"name": "PGHOST", "value": server},
                        {"name": "PGUSER", "value": "app"},
                        {"name": "PGDATABASE", "value": "postgres"},
                        {"name": "PGAPPNAME", "value": CLIENT_APP},
                        {"name": "PGPASSWORD", "value": APP_PASSWORD},
                    ],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def client_sessions(host: str, namespace: str, count: int) -> list[int] | None:
    """The pids of the client pod's idle sessions once all `count` are there (else None): matched by the
    pod's own address, so nothing else on the server can be mistaken for them."""
    client_ip = kubectl_json("get", "pod", CLIENT_POD, "-n", namespace)["status"].get("podIP")
    if not client_ip:
        return None
    with superuser(host) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_addr = %s::inet AND application_name = %s"
            " AND usename = %s AND state = 'idle' ORDER BY pid",
            (client_ip, CLIENT_APP, "app"),
        ).fetchall()
    return [row[0] for row in rows] if len(rows) == count else None
