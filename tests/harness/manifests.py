"""The shipped manifests and examples, installed and adapted as a user would (this module holds no tests).

Shared by the manifest and RBAC tests: `manifests/` applied with `kubectl apply -k`, the examples'
Secret and policy with only the test server's password and port put in, the role script run with psql.
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from psycopg import sql

from pgwarden.policy.api import GROUP, PLURAL, VERSION
from tests.fixtures.operator import crd_established
from tests.harness.controlplane import ControlPlane
from tests.harness.policies import PASSWORD, open_app_sessions
from tests.harness.postgres import PgServer, wait_for

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
EXAMPLES = MANIFESTS / "examples"
ROLE_SCRIPT = EXAMPLES / "pgwarden-role.sql"
SYSTEM_NAMESPACE = "pgwarden-system"
ROLE = "pgwarden"  # the PostgreSQL role pgwarden-role.sql creates
# kubectl maps every object of an apply to its API before applying any: a custom object whose CRD is
# created by the same apply cannot be mapped on a cluster that has never seen that CRD.
CRDS_FIRST = "ensure CRDs are installed first"
CRD_NAMES = ("postgrespolicies.pgwarden.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")


def documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file, as fresh dicts the caller may change."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def example(name: str, kind: str) -> dict[str, Any]:
    """The one object of `kind` in manifests/examples/<name>."""
    (doc,) = [d for d in documents(EXAMPLES / name) if d["kind"] == kind]
    return doc


def apply_documents(plane: ControlPlane, namespace: str, docs: list[dict[str, Any]], path: Path) -> str:
    """Write `docs` to `path` and `kubectl apply -f` them into `namespace`, as a user would; returns stdout."""
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return plane.kubectl("apply", "-n", namespace, "-f", str(path)).stdout


def policies_served(api: client.ApiClient, namespace: str) -> bool:
    """True once postgrespolicies answer (Established comes a moment before the handler is installed)."""
    try:
        client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    except client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def install_manifests(plane: ControlPlane) -> subprocess.CompletedProcess[str]:
    """Install manifests/ with `kubectl apply -k`; return the first attempt, which is what a one-shot install gets.

    If that attempt failed only because a custom object's CRD is created by the same apply (kubectl maps
    every object before applying any; see test_apply_installs_everything_in_one_go_on_a_fresh_cluster),
    everything else has been applied, and a second apply once the CRDs are established completes the
    install, as it would for a user who re-runs the command. Any other failure fails here.
    """
    first = plane.kubectl("apply", "-k", str(MANIFESTS), check=False)
    with plane.api_client() as api:
        if first.returncode != 0:
            assert CRDS_FIRST in first.stderr, f"kubectl apply -k manifests/ failed:\n{first.stderr}"
            for name in CRD_NAMES:
                wait_for(partial(crd_established, api, name), timeout=30, message=f"CRD {name} Established")
            plane.kubectl("apply", "-k", str(MANIFESTS))
        for name in CRD_NAMES:
            wait_for(partial(crd_established, api, name), timeout=30, message=f"CRD {name} Established")
        wait_for(lambda: policies_served(api, "default"), timeout=30, message="postgrespolicies to be served")
    return first


def run_role_script(server: PgServer, script: Path) -> None:
    """Run a role script with psql as the superuser, the way pgwarden-role.sql's header tells users to."""
    subprocess.run(
        [
            str(server.bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(server.socket_dir),
            "-p",
            str(server.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-f",
            str(script),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def set_role_password(server: PgServer, role: str, password: str) -> None:
    """What `\\password <role>` does in psql (the script's header); ALTER ROLE takes no parameters."""
    with server.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))


def prepare_example_server(server: PgServer) -> None:
    """The role from pgwarden-role.sql (base section) with a password, and an application role to reap."""
    run_role_script(server, ROLE_SCRIPT)
    set_role_password(server, ROLE, PASSWORD)
    server.create_role("app", password=PASSWORD)


def example_secret() -> dict[str, Any]:
    """credentials-secret.yaml with the test server's password in place of the placeholder."""
    secret = example("credentials-secret.yaml", "Secret")
    assert secret["stringData"]["username"] == ROLE
    secret["stringData"]["password"] = PASSWORD
    return secret


def fast_idle_reaper(port: int) -> dict[str, Any]:
    """idle-reaper.yaml as shipped (the seed's rule), with a 2s stateAge and the test server's port."""
    policy = example("idle-reaper.yaml", "PostgresPolicy")
    (rule,) = policy["spec"]["sessions"]
    assert rule == {"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "10m"}
    rule["stateAge"] = "2s"
    policy["spec"]["connection"]["port"] = port
    return policy


def open_session_mix(server: PgServer) -> tuple[list[int], list[int]]:
    """Three idle application sessions the idle reaper must terminate, and two it must leave alone.

    The survivors run a query or hold a transaction open. With pgwarden's own connection that is six
    client backends, so the default maxFractionPerCycle (0.5) lets one cycle reap all three. No idle
    superuser session here: pgwarden cannot signal it, and today the refusal marks the target failing
    (Ready False), which would make the Ready assertions depend on the order of cycles.
    """
    doomed = open_app_sessions(server, 3)
    survivors = [
        *open_app_sessions(server, 1, state="active"),
        *open_app_sessions(server, 1, state="idle in transaction"),
    ]
    return doomed, survivors
