"""Policy reports for real: the pinned openreports CRDs on kube-apiserver, the operator as a process, real PostgreSQL.

A Report per policy holds one result per rule and pod: `fail` naming the pod while a rule reaps its sessions,
`pass` for a rule that matched nothing, `error` for a target that cannot be reached; counts in `summary`. It is
written only when that changes (its resourceVersion holds over quiet cycles), removed with its policy, and
without the CRDs (or with --no-policy-reports) the operator says reports are off and enforces as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy.api import API_VERSION, GROUP, KIND, PLURAL, REPORT_SOURCE, VERSION, ReportResult
from tests.fixtures.operator import OperatorFactory, OperatorProcess
from tests.fixtures.postgres import PgFactory
from tests.harness.k8s import create_running_pod
from tests.harness.openreports import (
    ReportHistory,
    get_report,
    install_openreports,
    remove_openreports,
    reports_served,
    results_by,
)
from tests.harness.policies import (
    create_policy,
    create_secret,
    custom,
    get_policy,
    next_host,
    open_app_sessions,
    policy_body,
    policy_gone,
    prepare_server,
    terminated_total,
)
from tests.harness.postgres import PgServer, holds_for, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

LIMITS = {"maxActionsPerCycle": 1, "maxFractionPerCycle": 1.0}  # one session per cycle: `fail` for a few cycles


@pytest.fixture
def openreports(k8s_api: client.ApiClient) -> Iterator[None]:
    """The openreports CRDs for one test; removed afterwards, so the session's other operators never see them."""
    install_openreports(k8s_api)
    yield
    remove_openreports(k8s_api)


@pytest.fixture
def servers(pg_factory: PgFactory) -> list[PgServer]:
    """Two servers on distinct addresses sharing one port, so one policy port reaches both."""
    first = pg_factory(host=next_host(), hba="password")
    second = pg_factory(host=next_host(), port=first.port, hba="password")
    for server in (first, second):
        prepare_server(server)
    return [first, second]


@pytest.fixture
def history(k8s_api: client.ApiClient, namespace: str) -> Iterator[ReportHistory]:
    recorder = ReportHistory(k8s_api, namespace)
    yield recorder
    recorder.stop()


def cycles(operator: OperatorProcess, namespace: str, policy: str) -> float:
    """Successful evaluations of the policy so far (all targets), from the operator's own metrics."""
    labels = f'namespace="{namespace}",policy="{policy}"'
    found = re.search(r"^pgwarden_cycle_duration_seconds_count\{" + labels + r"\} (\S+)$", operator.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def counted(report: dict[str, Any]) -> dict[str, int]:
    """The summary the results imply."""
    verdicts = [r["result"] for r in report["results"]]
    return {v.value: verdicts.count(v.value) for v in ReportResult}


def test_report_fails_while_reaping_passes_quiet_rules_errors_unreachable_and_goes_with_the_policy(
    k8s_api: client.ApiClient,
    namespace: str,
    servers: list[PgServer],
    openreports: None,
    history: ReportHistory,
    run_operator: OperatorFactory,
) -> None:
    target, quiet = servers
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)
    create_running_pod(k8s_api, namespace, "db-1", {"app": "pg"}, quiet.host)
    create_running_pod(k8s_api, namespace, "db-broken", {"app": "pg"}, next_host())  # nothing listens there
    doomed = open_app_sessions(target, 3)
    operator = run_operator([namespace])
    assert "policy reports on" in operator.logs()
    create_policy(k8s_api, namespace, policy_body("reaper", target.port, limits=LIMITS))
    for pid in doomed:
        target.wait_gone(pid, timeout=30)
    wait_for(lambda: terminated_total(k8s_api, namespace, "reaper") >= 3, timeout=30, message="status totals")

    # While it reaped: `fail` for rule idle on db-0, naming a session it terminated, counted in the summary.
    def failing() -> list[dict[str, Any]]:
        return [
            v for v in history.versions("reaper") if results_by(v).get(("db-0", "idle"), {}).get("result") == "fail"
        ]

    failed = wait_for(failing, timeout=30, message="a Report version with rule idle failing on db-0")
    for version in failed:
        result = results_by(version)[("db-0", "idle")]
        assert result["resources"] == [{"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": "db-0"}]
        assert result["policy"] == "reaper"
        assert result["source"] == REPORT_SOURCE
        # "terminated 1 session(s): pid 123[; 2 more left alone (maxActionsPerCycle: 2)]"
        pids = [int(p) for p in re.findall(r"\d+", result["message"].split("pid", 1)[1].split(";")[0])]
        assert pids, result["message"]
        assert set(pids) <= set(doomed), result["message"]
        assert result["properties"]["sessions"] == str(len(pids))
        assert version["summary"] == counted(version)
        assert version["summary"]["fail"] >= 1

    # Then steady: db-0 and db-1 pass rule idle, db-broken is one error.
    def steady() -> dict[str, Any] | None:
        report = get_report(k8s_api, namespace, "reaper")
        wanted = {("db-0", "idle"): "pass", ("db-1", "idle"): "pass", ("db-broken", None): "error"}
        got = {k: r["result"] for k, r in results_by(report).items()} if report else None
        return report if got == wanted else None

    report = wait_for(steady, timeout=60, message="db-0 and db-1 passing, db-broken an error")
    assert report["summary"] == {"pass": 2, "fail": 0, "warn": 0, "error": 1, "skip": 0}
    assert results_by(report)[("db-1", "idle")]["message"] == "no session matched"
    assert results_by(report)[("db-broken", None)]["message"]
    policy = get_policy(k8s_api, namespace, "reaper")
    (owner,) = report["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["name"]) == (API_VERSION, KIND, "reaper")
    assert owner["uid"] == policy["metadata"]["uid"]

    # Quiet cycles write nothing: the resourceVersion holds while both servers are evaluated again and again
    # (every 2s: the idle rule's threshold) and the broken target keeps failing.
    version = report["metadata"]["resourceVersion"]
    before = cycles(operator, namespace, "reaper")
    assert holds_for(lambda: get_report(k8s_api, namespace, "reaper")["metadata"]["resourceVersion"] == version, 8)  # type: ignore[index]
    assert cycles(operator, namespace, "reaper") >= before + 4, "the targets were not evaluated meanwhile"

    custom(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "reaper")
    wait_for(lambda: policy_gone(k8s_api, namespace, "reaper"), timeout=30, message="the policy to go")
    wait_for(lambda: get_report(k8s_api, namespace, "reaper") is None, timeout=30, message="the Report to go")
    # The operator deleted it (no garbage collector runs here); its log line may land a moment later.
    wait_for(lambda: "policy report deleted" in operator.logs(), timeout=10, message="the deletion logged")


def test_dry_run_fails_for_as_long_as_sessions_would_be_reaped(
    k8s_api: client.ApiClient, namespace: str, servers: list[PgServer], openreports: None, run_operator: OperatorFactory
) -> None:
    target = servers[0]
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)
    kept = open_app_sessions(target, 2)
    run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("watcher", target.port, mode="dryRun"))

    def would() -> dict[str, Any] | None:
        # Both sessions: the first evaluation may come exactly when the first one crosses stateAge, before the
        # second (opened a moment later) has.
        report = get_report(k8s_api, namespace, "watcher")
        result = results_by(report).get(("db-0", "idle")) if report else None
        return report if result and result["result"] == "fail" and result["properties"]["sessions"] == "2" else None

    report = wait_for(would, timeout=30, message="rule idle failing in dry run for both sessions")
    result = results_by(report)[("db-0", "idle")]
    assert result["message"] == f"would terminate 2 session(s): pid {', '.join(str(p) for p in sorted(kept))}"
    assert result["properties"]["enforcementAction"] == "dryRun"
    # Nothing changes while the sessions stay: the same verdict, not rewritten cycle after cycle.
    version = report["metadata"]["resourceVersion"]
    assert holds_for(lambda: get_report(k8s_api, namespace, "watcher")["metadata"]["resourceVersion"] == version, 5)  # type: ignore[index]
    assert all(target.alive(pid) for pid in kept)


def test_no_policy_reports_flag_turns_them_off_with_the_crds_installed(
    k8s_api: client.ApiClient, namespace: str, servers: list[PgServer], openreports: None, run_operator: OperatorFactory
) -> None:
    target = servers[0]
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)
    doomed = open_app_sessions(target, 2)
    operator = run_operator([namespace], extra=["--no-policy-reports"])
    create_policy(k8s_api, namespace, policy_body("reaper", target.port))
    for pid in doomed:
        target.wait_gone(pid, timeout=30)
    wait_for(lambda: terminated_total(k8s_api, namespace, "reaper") >= 2, timeout=30, message="status totals")
    assert "policy reports off" in operator.logs()
    assert get_report(k8s_api, namespace, "reaper") is None


def test_without_the_crds_reports_are_off_and_enforcement_is_unchanged(
    k8s_api: client.ApiClient, namespace: str, servers: list[PgServer], run_operator: OperatorFactory
) -> None:
    if reports_served(k8s_api):  # left by an interrupted run: this test is about a cluster without them
        remove_openreports(k8s_api)
    target = servers[0]
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)
    doomed = open_app_sessions(target, 2)
    operator = run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("reaper", target.port))
    for pid in doomed:
        target.wait_gone(pid, timeout=30)
    wait_for(lambda: terminated_total(k8s_api, namespace, "reaper") >= 2, timeout=30, message="status totals")
    logs = operator.logs()
    assert "policy reports off" in logs
    assert "reports CRD is not installed" in logs
    assert "policy report" not in logs.replace("policy reports off", "")  # no attempt to write one
