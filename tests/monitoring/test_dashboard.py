"""The Grafana dashboard and the alert rules against a real Prometheus scraping a running pgwarden.

Real PostgreSQL, real API server, the operator as a process, and Prometheus (built from its Go module)
scraping the operator's /metrics every second. Sessions make pgwarden act (idle application sessions
terminated), skip (a superuser's idle session the non-superuser role may not signal: notPermitted) and
fail (a second pod whose address has no server). Then every panel's query of
manifests/monitoring/grafana-dashboard.json, its variables substituted, must return data, and every alert
expression must name series Prometheus really holds, firing for what is wrong here and silent for the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy.api import SkipReason
from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.k8s import create_running_pod
from tests.harness.policies import (
    PASSWORD,
    create_policy,
    create_secret,
    next_host,
    open_app_sessions,
    policy_body,
    prepare_server,
)
from tests.harness.postgres import wait_for
from tests.harness.prometheus import PrometheusServer
from tests.monitoring.test_alert_rules import alert_rules

pytestmark = [pytest.mark.k8s, pytest.mark.pg, pytest.mark.prometheus]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "manifests" / "monitoring" / "grafana-dashboard.json"
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval: at least 4 scrapes of the 1s interval used here
POLICY = "reaper"

# What this scenario makes true, so what must fire; the other alerts must stay silent. Alerts whose
# expression holds now fire only after their `for:`; the expression itself is what is checked here.
TRUE_HERE = {"PgwardenTargetFailing", "PgwardenPolicyNotReady", "PgwardenSessionsNotPermitted"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def substitute(expr: str, namespace: str) -> str:
    """The query Grafana sends with the variables at this test's values ($pod: All, Grafana's `.*`)."""
    values = {"namespace": namespace, "policy": POLICY, "pod": ".*", "__rate_interval": RATE_INTERVAL}
    out = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)
    assert "$" not in out, out
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bpgwarden_[a-z_]+\b", expr))


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[list[PrometheusServer]]:
    """Holder for the test's Prometheus (started once the operator's port is known); stopped at teardown."""
    started: list[PrometheusServer] = []
    yield started
    for server in started:
        server.stop()


def test_every_panel_and_alert_expression_returns_data_from_a_live_pgwarden(
    k8s_api: client.ApiClient,
    namespace: str,
    pg_factory: PgFactory,
    run_operator: OperatorFactory,
    prometheus: list[PrometheusServer],
    tmp_path: Path,
) -> None:
    server = pg_factory(host=next_host(), hba="password")
    prepare_server(server)  # `warden`: pg_signal_backend and pg_read_all_stats, not a superuser
    server.create_role("boss", password=PASSWORD, superuser=True)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    create_running_pod(k8s_api, namespace, "db-1", {"app": "pg"}, next_host())  # nothing listens there
    victims = open_app_sessions(server, 3)
    boss = server.open_session("idle", user="boss", password=PASSWORD, application_name="web")
    operator = run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body(POLICY, server.port, interval="1s"))
    prom = PrometheusServer(tmp_path, [f"127.0.0.1:{operator.metrics_port}"])
    prometheus.append(prom)

    for pid in victims:
        server.wait_gone(pid, timeout=30)
    assert server.alive(boss.pid)
    wait_for(prom.targets_up, timeout=30, message="Prometheus scraping the operator")

    def every_panel_has_data() -> bool:
        return all(prom.query(substitute(expr, namespace)) for _, expr in panel_queries())

    try:
        wait_for(every_panel_has_data, timeout=60, interval=1, message="data in every panel")
    except AssertionError:
        empty = [title for title, expr in panel_queries() if not prom.query(substitute(expr, namespace))]
        raise AssertionError(f"panels without data: {empty}\n{prom.logs()[-2000:]}") from None

    # The panels show this scenario, not just any data: the skips are notPermitted, the errors db-1's.
    skips = prom.query(f'pgwarden_skipped_total{{namespace="{namespace}", policy="{POLICY}"}}')
    assert {s["metric"]["reason"] for s in skips} == {SkipReason.NOT_PERMITTED}
    errors = prom.query(f'pgwarden_target_errors_total{{namespace="{namespace}"}}')
    assert {s["metric"]["pod"] for s in errors} == {"db-1"}
    terminated = prom.query(f'sum(pgwarden_actions_total{{namespace="{namespace}", action="terminate"}})')
    assert float(terminated[0]["value"][1]) == len(victims)

    # Every metric the alerts name is a series pgwarden really exports (promtool checks syntax only) ...
    held = prom.series_names()
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= held, (rule["alert"], metric_names(rule["expr"]) - held)

    # ... and each expression holds for what is wrong here, and only for it.
    def firing(rule: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in prom.query(rule["expr"]) if s["metric"].get("namespace") == namespace]

    def expressions_settled() -> bool:
        return all(bool(firing(rule)) == (rule["alert"] in TRUE_HERE) for rule in alert_rules())

    try:
        wait_for(expressions_settled, timeout=60, interval=1, message="alert expressions")
    except AssertionError:
        state = {rule["alert"]: firing(rule) for rule in alert_rules()}
        raise AssertionError(f"alert expressions: {state}") from None
    (failing,) = firing(next(r for r in alert_rules() if r["alert"] == "PgwardenTargetFailing"))
    assert failing["metric"]["pod"] == "db-1"
