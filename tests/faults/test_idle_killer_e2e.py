"""The idle killer end to end: a server whose idle_session_timeout (1 s) is shorter than the policy's
interval (5 s) never makes the policy Degraded."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from kubernetes import client

from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.faults import report_figures
from tests.harness.k8s import create_running_pod
from tests.harness.policies import condition, create_policy, create_secret, get_policy, policy_body, prepare_server
from tests.harness.postgres import holds_for, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

_octets = itertools.count(10)


def test_server_idle_timeout_shorter_than_the_interval_never_degrades_the_policy(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    server = pg_factory(host=f"127.0.{next(_octets)}.47", hba="password", settings={"idle_session_timeout": "'1s'"})
    prepare_server(server)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("idle-killer", server.port))

    def ready() -> dict[str, Any] | None:
        policy = get_policy(k8s_api, namespace, "idle-killer")
        cond = condition(policy, "Ready")
        return policy if cond is not None and cond["status"] == "True" else None

    wait_for(ready, timeout=60, message="Ready=True after the first cycle")
    bystander = server.open_session("idle", via_socket=True)
    server.wait_gone(bystander.pid, timeout=10)  # the killer is real

    def healthy() -> bool:
        policy = get_policy(k8s_api, namespace, "idle-killer")
        degraded = condition(policy, "Degraded")
        errors = [t for t in (policy.get("status") or {}).get("targets") or [] if t.get("error")]
        return (degraded is None or degraded["status"] == "False") and not errors

    held = holds_for(healthy, 16.0)  # three intervals: every other cycle failed before the fix
    report_figures("external idle killer", "server idle_session_timeout=1s, interval 5s (operator)")
    assert held
