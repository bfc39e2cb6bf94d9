"""The autovacuum cap's lifecycle on the real API server: what pgwarden writes is recorded in status
(`targets[].autovacuum.written`) and reset when the policy stops wanting it there, and only then.

Ground truth is the server's own postgresql.auto.conf (pg_file_settings) and the API server's objects.
"""

from __future__ import annotations

import os
import signal
from functools import partial
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy.api import GROUP, PLURAL, VERSION, ConditionReason, ConditionType, EventReason
from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.k8s import create_running_pod, delete_pod, set_pod_labels
from tests.harness.policies import (
    PASSWORD,
    condition,
    create_policy,
    create_secret,
    custom,
    events,
    get_policy,
    next_host,
    patch_spec,
    policy_body,
    policy_gone,
)
from tests.harness.postgres import PgServer, holds_for, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]


def auto_conf(server: PgServer) -> list[str]:
    """The autovacuum_max_workers lines of postgresql.auto.conf, as the server reads them."""
    rows = server.execute(
        "SELECT setting FROM pg_file_settings WHERE name = 'autovacuum_max_workers' "
        "AND sourcefile LIKE '%/postgresql.auto.conf'"
    )
    return [str(r[0]) for r in rows]


def written(api: client.ApiClient, namespace: str, name: str, pod: str) -> dict[str, Any] | None:
    """The `autovacuum.written` record of one pod in the policy's status."""
    for target in (get_policy(api, namespace, name).get("status") or {}).get("targets") or []:
        if target.get("pod") == pod:
            record = (target.get("autovacuum") or {}).get("written")
            return dict(record) if record else None
    return None


def capped_server(pg_factory: PgFactory) -> PgServer:
    server = pg_factory(host=next_host(), hba="password")
    # A superuser: the point is the lifecycle, not the grants (tests/pg/test_autovacuum.py covers those).
    server.create_role("warden", password=PASSWORD, superuser=True)
    return server


def start(
    api: client.ApiClient, namespace: str, server: PgServer, run_operator: OperatorFactory, max_workers: int = 2
) -> None:
    """A pod on `server`, the operator, and an enforcing cap; returns once the write is recorded."""
    create_secret(api, namespace)
    create_running_pod(api, namespace, "db-0", {"app": "pg"}, server.host)
    run_operator([namespace])
    create_policy(
        api, namespace, policy_body("capper", server.port, sessions=[], autovacuum={"maxWorkers": max_workers})
    )
    wait_for(lambda: auto_conf(server) == [str(max_workers)], timeout=30, message="the cap in postgresql.auto.conf")
    record = wait_for(
        lambda: written(api, namespace, "capper", "db-0"), timeout=30, message="status.targets[].autovacuum.written"
    )
    assert record["value"] == max_workers
    assert record["time"]


def test_removing_spec_autovacuum_resets_what_was_written_and_drops_the_record(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    server = capped_server(pg_factory)
    start(k8s_api, namespace, server, run_operator)
    patch_spec(k8s_api, namespace, "capper", {"autovacuum": None})
    wait_for(lambda: auto_conf(server) == [], timeout=30, message="ALTER SYSTEM RESET after spec.autovacuum went")
    wait_for(
        lambda: written(k8s_api, namespace, "capper", "db-0") is None, timeout=30, message="the record to be dropped"
    )
    # Released once: a value set afterwards by someone else is not pgwarden's to reset.
    server.execute("ALTER SYSTEM SET autovacuum_max_workers = 2")
    assert holds_for(lambda: auto_conf(server) == ["2"], 3)


def test_deselecting_the_pod_resets_what_was_written(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    server = capped_server(pg_factory)
    start(k8s_api, namespace, server, run_operator)
    set_pod_labels(k8s_api, namespace, "db-0", {"app": "elsewhere"})
    wait_for(lambda: auto_conf(server) == [], timeout=30, message="ALTER SYSTEM RESET after the pod left the selector")
    wait_for(lambda: written(k8s_api, namespace, "capper", "db-0") is None, timeout=30, message="the pod's entry to go")


def test_what_cannot_be_released_is_named_in_an_autovacuum_left_behind_event(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    """A deleted pod cannot be reached through the API any more: its value stays, and a Warning says so."""
    server = capped_server(pg_factory)
    start(k8s_api, namespace, server, run_operator)
    delete_pod(k8s_api, namespace, "db-0")

    def left_behind() -> list[Any]:
        found = events(k8s_api, namespace, "capper")
        return [e for e in found if e.reason == EventReason.AUTOVACUUM_LEFT_BEHIND]

    left = wait_for(left_behind, timeout=30, message="an AutovacuumLeftBehind Event")
    assert left[0].type == "Warning"
    assert "db-0" in left[0].message
    assert "autovacuum_max_workers = 2" in left[0].message
    assert auto_conf(server) == ["2"]
    custom(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "capper")
    wait_for(lambda: policy_gone(k8s_api, namespace, "capper"), timeout=30, message="the policy to go")
    assert auto_conf(server) == ["2"]


def auto_conf_stamp(server: PgServer) -> tuple[int, int]:
    """ALTER SYSTEM replaces postgresql.auto.conf by rename: a new inode and mtime show any write at all."""
    st = (server.datadir / "postgresql.auto.conf").stat()
    return st.st_ino, st.st_mtime_ns


def test_two_policies_with_different_caps_on_one_pod_write_once_and_both_report_the_conflict(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    server = capped_server(pg_factory)
    start(k8s_api, namespace, server, run_operator)  # "capper" wants 2 and writes it, once
    stamp = auto_conf_stamp(server)
    create_policy(k8s_api, namespace, policy_body("other", server.port, sessions=[], autovacuum={"maxWorkers": 3}))

    def conflicted(name: str) -> dict[str, Any] | None:
        cond = condition(get_policy(k8s_api, namespace, name), ConditionType.DEGRADED)
        ok = cond and cond["status"] == "True" and cond["reason"] == ConditionReason.AUTOVACUUM_CONFLICT
        return cond if ok else None

    for name, other in (("capper", "other"), ("other", "capper")):
        cond = wait_for(partial(conflicted, name), timeout=30, message=f"{name}: Degraded AutovacuumConflict")
        assert f"{namespace}/{other}" in cond["message"]
    # Neither writes again: the file keeps the first write, through several intervals (5 s) of both.
    assert holds_for(lambda: (auto_conf_stamp(server), auto_conf(server)) == (stamp, ["2"]), 12)
    assert conflicted("capper")
    assert conflicted("other")


def test_an_operator_killed_right_after_alter_system_still_releases_on_deletion(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    """SIGKILL the operator the moment the value is in postgresql.auto.conf: the record written ahead of the
    ALTER SYSTEM is in status, and the next operator's finalizer resets the value."""
    server = capped_server(pg_factory)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    first = run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("capper", server.port, sessions=[], autovacuum={"maxWorkers": 2}))
    wait_for(lambda: auto_conf(server) == ["2"], timeout=30, interval=0.01, message="the cap in postgresql.auto.conf")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    record = written(k8s_api, namespace, "capper", "db-0")
    assert record is not None
    assert record["value"] == 2
    run_operator([namespace])
    custom(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "capper")
    wait_for(lambda: auto_conf(server) == [], timeout=30, message="the new operator's finalizer to reset the cap")
    wait_for(lambda: policy_gone(k8s_api, namespace, "capper"), timeout=30, message="the policy to go")


def test_a_dbas_value_written_while_the_operator_was_down_is_reported_not_overwritten(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    """The engine's memory of what it wrote goes with the process; status keeps it (`autovacuum.written`), so
    the next operator knows that a different value in postgresql.auto.conf is someone else's: Degraded
    AutovacuumConflict naming it, and the file left as the DBA wrote it."""
    server = capped_server(pg_factory)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    first = run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("capper", server.port, sessions=[], autovacuum={"maxWorkers": 2}))
    wait_for(lambda: written(k8s_api, namespace, "capper", "db-0"), timeout=30, message="the write recorded")
    wait_for(lambda: auto_conf(server) == ["2"], timeout=30, message="the cap in postgresql.auto.conf")
    first.stop()
    server.execute("ALTER SYSTEM SET autovacuum_max_workers = 4")  # the DBA, while no operator runs
    stamp = auto_conf_stamp(server)
    run_operator([namespace])

    def conflicted() -> dict[str, Any] | None:
        cond = condition(get_policy(k8s_api, namespace, "capper"), ConditionType.DEGRADED)
        ok = cond and cond["status"] == "True" and cond["reason"] == ConditionReason.AUTOVACUUM_CONFLICT
        return cond if ok else None

    cond = wait_for(conflicted, timeout=30, message="Degraded AutovacuumConflict")
    assert "postgresql.auto.conf holds 4, not written by pgwarden" in cond["message"]
    assert holds_for(lambda: (auto_conf_stamp(server), auto_conf(server)) == (stamp, ["4"]), 11)  # two intervals
    assert conflicted()
