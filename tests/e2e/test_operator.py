"""The operator for real: a kopf process against kube-apiserver + etcd, enforcing on real PostgreSQL.

Pods are API objects pointing at local servers on distinct 127.0.0.x addresses (no kubelet runs).
Every wait polls with a deadline; assertions read pg_stat_activity and the API server, never the
operator's memory.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy.api import GROUP, KIND, PLURAL, VERSION, ConditionReason, ConditionType, EventReason, SkipReason
from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.k8s import create_running_pod, set_pod_labels
from tests.harness.policies import (
    PASSWORD,
    condition,
    create_policy,
    create_secret,
    custom,
    events,
    get_policy,
    next_host,
    open_app_sessions,
    patch_spec,
    policy_body,
    policy_gone,
    prepare_server,
)
from tests.harness.postgres import PgServer, holds_for, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]


@pytest.fixture
def servers(pg_factory: PgFactory) -> list[PgServer]:
    """Two servers on distinct addresses sharing one port, so one policy port reaches both."""
    first = pg_factory(host=next_host(), hba="password")
    second = pg_factory(host=next_host(), port=first.port, hba="password")
    for server in (first, second):
        prepare_server(server)
    return [first, second]


def test_idle_sessions_reaped_on_matching_pod_only_with_status_events_and_metrics(
    k8s_api: client.ApiClient, namespace: str, servers: list[PgServer], run_operator: OperatorFactory
) -> None:
    target, bystander = servers
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)
    create_running_pod(k8s_api, namespace, "other-0", {"app": "other"}, bystander.host)
    doomed = open_app_sessions(target, 3)
    busy = open_app_sessions(target, 1, state="active")
    untouched = open_app_sessions(bystander, 2)
    protected = target.open_session("idle", user="postgres", application_name="web", via_socket=True).pid
    operator = run_operator([namespace])
    # One action per cycle: the other sessions wait for the next cycles, skipped as maxActionsPerCycle.
    limits = {"maxActionsPerCycle": 1, "maxFractionPerCycle": 1.0}
    create_policy(k8s_api, namespace, policy_body("reaper", target.port, limits=limits))

    for pid in doomed:
        target.wait_gone(pid, timeout=30)
    assert all(target.alive(pid) for pid in [*busy, protected])
    assert all(bystander.alive(pid) for pid in untouched)

    def acted_status() -> dict[str, Any] | None:
        policy = get_policy(k8s_api, namespace, "reaper")
        status = policy.get("status") or {}
        return policy if (status.get("totals") or {}).get("terminated", 0) >= 3 else None

    policy = wait_for(acted_status, timeout=30, message="status totals to count the terminations")
    status = policy["status"]
    assert status["observedGeneration"] == policy["metadata"]["generation"]
    (entry,) = status["targets"]
    assert entry["pod"] == "db-0"
    assert entry["podIP"] == target.host
    assert entry["serverVersion"].split(".")[0] == target.major
    assert entry["backends"]["checkpointer"] == 1
    assert entry["backends"]["client backend"] >= 2
    # Which sessions went is read from structured fields (the Event message's wording is the unit tests' job).
    assert status["totals"]["terminated"] == len(doomed)
    assert {a["pid"] for a in entry["lastActions"]} <= set(doomed)
    assert {(a["rule"], a["action"], a["done"]) for a in entry["lastActions"]} == {("idle", "terminate", True)}
    ready = condition(policy, ConditionType.READY)
    assert ready is not None
    assert ready["status"] == "True"

    def terminations_evented() -> list[Any]:
        return [e for e in events(k8s_api, namespace, "reaper") if e.reason == EventReason.SESSIONS_TERMINATED]

    for event in wait_for(terminations_evented, timeout=30, message="SessionsTerminated Events"):
        assert event.type == "Normal"
        assert (event.involved_object.kind, event.involved_object.name) == (KIND, "reaper")
        assert "pod db-0" in event.message
        assert "rule idle" in event.message
    metrics = operator.metrics()
    assert (
        f'pgwarden_actions_total{{action="terminate",mode="enforce",namespace="{namespace}",policy="reaper",rule="idle"}}'
        in metrics
    )
    assert (
        f'pgwarden_backends{{backend_type="checkpointer",namespace="{namespace}",pod="db-0",policy="reaper"}} 1.0'
        in metrics
    )
    labels = f'namespace="{namespace}",policy="reaper",reason="{SkipReason.MAX_ACTIONS}",rule="idle"'
    skipped = re.search(r"^pgwarden_skipped_total\{" + re.escape(labels) + r"\} (\S+)$", metrics, re.MULTILINE)
    assert skipped is not None, metrics
    assert float(skipped.group(1)) >= 1
    assert f'pgwarden_targets{{namespace="{namespace}",policy="reaper"}} 1.0' in metrics


def test_dry_run_then_edit_to_enforce_then_delete_stops_enforcement(
    k8s_api: client.ApiClient, namespace: str, servers: list[PgServer], run_operator: OperatorFactory
) -> None:
    target = servers[0]
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)
    sessions = open_app_sessions(target, 2)
    run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("reaper", target.port, mode="dryRun"))

    def dry_run_event() -> bool:
        return any(e.reason == EventReason.DRY_RUN for e in events(k8s_api, namespace, "reaper"))

    def dry_run_reported() -> dict[str, Any] | None:
        policy = get_policy(k8s_api, namespace, "reaper")
        targets = (policy.get("status") or {}).get("targets") or []
        return policy if targets and targets[0].get("lastActions") else None

    wait_for(dry_run_event, timeout=30, message="a DryRun event")
    assert all(target.alive(pid) for pid in sessions)
    # The Event is posted as the evaluation ends, the status written by the step that harvests it: wait for both.
    policy = wait_for(dry_run_reported, timeout=30, message="the dry run's actions in the status")
    assert all(a["done"] is False for a in policy["status"]["targets"][0]["lastActions"])
    assert policy["status"]["totals"]["actions"] == 0

    patch_spec(k8s_api, namespace, "reaper", {"enforcementAction": "enforce"})
    for pid in sessions:
        target.wait_gone(pid, timeout=30)

    custom(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "reaper")

    wait_for(lambda: policy_gone(k8s_api, namespace, "reaper"), timeout=30, message="policy and finalizer to go")
    survivor = open_app_sessions(target, 1)[0]
    # Enforcement stopped: the session outlives several thresholds (2s) and intervals (5s).
    assert holds_for(lambda: target.alive(survivor), 8)


def test_label_change_adds_a_target_and_unreachable_target_degrades_without_blocking(
    k8s_api: client.ApiClient, namespace: str, servers: list[PgServer], run_operator: OperatorFactory
) -> None:
    first, second = servers
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, first.host)
    create_running_pod(k8s_api, namespace, "db-1", {"app": "staging"}, second.host)
    nobody_home = next_host()  # nothing listens there: a target that cannot be reached
    create_running_pod(k8s_api, namespace, "db-broken", {"app": "pg"}, nobody_home)
    run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("reaper", first.port))
    reaped_first = open_app_sessions(first, 2)
    kept_second = open_app_sessions(second, 2)
    for pid in reaped_first:
        first.wait_gone(pid, timeout=30)

    def degraded() -> dict[str, Any] | None:
        policy = get_policy(k8s_api, namespace, "reaper")
        cond = condition(policy, ConditionType.DEGRADED)
        return policy if cond and cond["status"] == "True" else None

    policy = wait_for(degraded, timeout=30, message="Degraded=True for the unreachable target")
    broken = next(t for t in policy["status"]["targets"] if t["pod"] == "db-broken")
    assert broken["error"]
    assert "db-broken" in condition(policy, ConditionType.DEGRADED)["message"]  # type: ignore[index]
    assert all(second.alive(pid) for pid in kept_second)

    set_pod_labels(k8s_api, namespace, "db-1", {"app": "pg"})
    for pid in kept_second:
        second.wait_gone(pid, timeout=30)


def test_missing_secret_is_a_condition_and_nothing_is_touched(
    k8s_api: client.ApiClient, namespace: str, servers: list[PgServer], run_operator: OperatorFactory
) -> None:
    target = servers[0]
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)
    sessions = open_app_sessions(target, 2)
    run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("reaper", target.port))

    def reported() -> dict[str, Any] | None:
        cond = condition(get_policy(k8s_api, namespace, "reaper"), ConditionType.READY)
        return cond if cond and cond["reason"] == ConditionReason.CREDENTIALS_SECRET_NOT_FOUND else None

    cond = wait_for(reported, timeout=30, message="Ready=False CredentialsSecretNotFound")
    assert cond["status"] == "False"
    assert "pg-credentials" in cond["message"]
    assert all(target.alive(pid) for pid in sessions)
    # Creating the Secret heals it without a restart.
    create_secret(k8s_api, namespace)
    for pid in sessions:
        target.wait_gone(pid, timeout=60)


def test_autovacuum_cap_dry_run_event_then_enforced_and_released_on_delete(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    """A dry run posts what the cap would do and writes nothing; enforced, it writes; the finalizer resets
    autovacuum_max_workers on the target before the policy goes (ALTER SYSTEM RESET)."""
    server = pg_factory(host=next_host(), hba="password")
    # A superuser here: the point is the finalizer, not the grants (tests/pg/test_autovacuum.py covers those).
    server.create_role("warden", password=PASSWORD, superuser=True)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    run_operator([namespace])
    body = policy_body("capper", server.port, mode="dryRun", sessions=[], autovacuum={"maxWorkers": 2})
    create_policy(k8s_api, namespace, body)

    def auto_conf() -> list[str]:
        rows = server.execute(
            "SELECT setting FROM pg_file_settings WHERE name = 'autovacuum_max_workers' "
            "AND sourcefile LIKE '%/postgresql.auto.conf'"
        )
        return [str(r[0]) for r in rows]

    def would_cap() -> bool:
        return any(
            e.reason == EventReason.DRY_RUN and "would set autovacuum_max_workers to 2" in e.message
            for e in events(k8s_api, namespace, "capper")
        )

    wait_for(would_cap, timeout=30, message="a DryRun Event saying the cap would be written")
    assert auto_conf() == []
    patch_spec(k8s_api, namespace, "capper", {"enforcementAction": "enforce"})
    wait_for(lambda: auto_conf() == ["2"], timeout=30, message="autovacuum_max_workers = 2 in postgresql.auto.conf")
    custom(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "capper")
    wait_for(lambda: auto_conf() == [], timeout=30, message="the finalizer to reset autovacuum_max_workers")

    wait_for(lambda: policy_gone(k8s_api, namespace, "capper"), timeout=30, message="the policy to go once released")


def test_a_dry_run_cap_never_writes_not_even_at_deletion(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    """Deleting a dry-run autovacuum cap leaves the setting alone, even when the value in
    postgresql.auto.conf is the one the policy names (a DBA's own ALTER SYSTEM): the finalizer resets
    only what an enforcing policy wrote."""
    server = pg_factory(host=next_host(), hba="password")
    server.create_role("warden", password=PASSWORD, superuser=True)
    server.execute("ALTER SYSTEM SET autovacuum_max_workers = 2")  # the DBA's own setting
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    run_operator([namespace])
    dry = policy_body("capper", server.port, mode="dryRun", sessions=[], autovacuum={"maxWorkers": 2})
    create_policy(k8s_api, namespace, dry)
    wait_for(
        lambda: (get_policy(k8s_api, namespace, "capper").get("status") or {}).get("targets"),
        timeout=30,
        message="the operator's first status",
    )

    def auto_conf() -> list[str]:
        rows = server.execute(
            "SELECT setting FROM pg_file_settings WHERE name = 'autovacuum_max_workers' "
            "AND sourcefile LIKE '%/postgresql.auto.conf'"
        )
        return [str(r[0]) for r in rows]

    custom(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "capper")
    wait_for(lambda: policy_gone(k8s_api, namespace, "capper"), timeout=30, message="the dry-run policy to go")
    assert holds_for(lambda: auto_conf() == ["2"], 3)
