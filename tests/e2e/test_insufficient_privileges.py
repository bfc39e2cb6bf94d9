"""A role without a grant the policy needs: Degraded InsufficientPrivileges, and one Warning Event, not one per cycle.

Real PostgreSQL, real API server, the operator (or a sidecar) as a process; the role really lacks
pg_signal_backend, and the Events and status are read from the API server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy.api import ConditionReason, ConditionType, EventReason
from tests.e2e.test_sidecar import SIDECAR, sidecar_identity
from tests.fixtures.operator import OperatorFactory, OperatorProcess
from tests.fixtures.postgres import PgFactory
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import create_running_pod
from tests.harness.policies import (
    PASSWORD,
    condition,
    create_policy,
    create_secret,
    events,
    get_policy,
    next_host,
    open_app_sessions,
    policy_body,
)
from tests.harness.postgres import wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]


def _cycles(operator: OperatorProcess, namespace: str, policy: str) -> int:
    """Evaluations the operator finished for the policy (pgwarden_cycle_duration_seconds_count)."""
    labels = f'namespace="{namespace}",policy="{policy}"'
    found = re.search(
        r"^pgwarden_cycle_duration_seconds_count\{" + re.escape(labels) + r"\} (\S+)$", operator.metrics(), re.M
    )
    return int(float(found.group(1))) if found else 0


def test_a_role_without_pg_signal_backend_is_degraded_with_one_warning_event(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    server = pg_factory(host=next_host(), hba="password")
    server.create_role("warden", password=PASSWORD, grants=("pg_read_all_stats",))  # no pg_signal_backend
    server.create_role("app", password=PASSWORD)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    sessions = open_app_sessions(server, 2)
    operator = run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("blind", server.port, interval="1s"))

    def degraded() -> dict[str, Any] | None:
        policy = get_policy(k8s_api, namespace, "blind")
        cond = condition(policy, ConditionType.DEGRADED)
        return policy if cond and cond["reason"] == ConditionReason.INSUFFICIENT_PRIVILEGES else None

    policy = wait_for(degraded, timeout=30, message="Degraded InsufficientPrivileges")
    degraded_cond = condition(policy, ConditionType.DEGRADED)
    ready = condition(policy, ConditionType.READY)
    assert degraded_cond is not None
    assert ready is not None
    assert degraded_cond["status"] == "True"
    assert (ready["status"], ready["reason"]) == ("False", ConditionReason.INSUFFICIENT_PRIVILEGES)
    (entry,) = policy["status"]["targets"]
    assert entry["error"].startswith("InsufficientPrivileges: ")
    assert "pg_signal_backend" in entry["error"]

    def warnings() -> list[Any]:
        return [e for e in events(k8s_api, namespace, "blind") if e.reason == EventReason.INSUFFICIENT_PRIVILEGES]

    (event,) = wait_for(warnings, timeout=30, message="the InsufficientPrivileges Warning Event")
    assert event.type == "Warning"
    assert "pg_signal_backend" in event.message
    # Several more cycles (counted by the operator's own metric): still that one Event, posted once.
    seen = _cycles(operator, namespace, "blind")
    wait_for(lambda: _cycles(operator, namespace, "blind") >= seen + 5, timeout=30, message="5 more cycles")
    (event,) = warnings()
    assert (event.count or 1) == 1
    # And nothing was signalled: the sessions the rule chose are still there.
    assert all(server.alive(pid) for pid in sessions)


def test_a_sidecar_whose_role_lacks_pg_signal_backend_reports_it_once(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    pg_factory: PgFactory,
    run_sidecar: Any,
    tmp_path: Path,
) -> None:
    """The same contract from a sidecar: the pod's entry carries the error, one Warning Event from the sidecar."""
    server = pg_factory(host=next_host(), hba="password")
    server.create_role("warden", password=PASSWORD, grants=("pg_read_all_stats",))
    server.create_role("app", password=PASSWORD)
    kubeconfig = sidecar_identity(control_plane, namespace, tmp_path)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host, annotations=SIDECAR)
    sessions = open_app_sessions(server, 2)
    create_policy(k8s_api, namespace, policy_body("blind", server.port, interval="1s"))
    sidecar = run_sidecar(kubeconfig, namespace, "db-0", server.dsn("warden", password=PASSWORD))

    def degraded() -> dict[str, Any] | None:
        policy = get_policy(k8s_api, namespace, "blind")
        cond = condition(policy, ConditionType.DEGRADED)
        return policy if cond and cond["reason"] == ConditionReason.INSUFFICIENT_PRIVILEGES else None

    policy = wait_for(degraded, timeout=30, message="Degraded InsufficientPrivileges")
    (entry,) = policy["status"]["targets"]
    assert entry["enforcer"] == "sidecar"
    assert entry["error"].startswith("InsufficientPrivileges: ")

    def warnings() -> list[Any]:
        return [e for e in events(k8s_api, namespace, "blind") if e.reason == EventReason.INSUFFICIENT_PRIVILEGES]

    (event,) = wait_for(warnings, timeout=30, message="the InsufficientPrivileges Warning Event")
    assert (event.type, event.source.component) == ("Warning", "pgwarden-sidecar")
    seen = _cycles(sidecar, namespace, "blind")
    wait_for(lambda: _cycles(sidecar, namespace, "blind") >= seen + 5, timeout=30, message="5 more cycles")
    (event,) = warnings()
    assert (event.count or 1) == 1
    assert all(server.alive(pid) for pid in sessions)
