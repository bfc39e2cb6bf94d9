"""pgwarden, as deployed, reaps idle sessions on a PostgreSQL pod of a StatefulSet on the real node.

Everything is real: the PostgreSQL image runs under the kubelet, a client pod holds the idle sessions over
the pod network as an application would, pgwarden reaches the server on its pod IP and reads the
credentials Secret with its ServiceAccount token.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgwarden.policy.api import EventReason
from pgwarden.policy.model import EnforcementAction, SessionAction
from tests.cluster.conftest import SYSTEM_NAMESPACE, kubectl_json
from tests.cluster.postgres_pod import (
    APP_PASSWORD,
    REAP_TIMEOUT,
    alive,
    apply,
    client_pod,
    client_sessions,
    credentials_secret,
    fast_idle_reaper,
    policy_totals,
    start_postgres,
)
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.cluster

METRICS_SERVICE = "pgwarden-metrics"


def metrics_address() -> str:
    """The metrics Service's ClusterIP and port, as Prometheus would find it (the host reaches the
    Service range: kube-proxy's rules apply to this machine's own traffic too)."""
    service = kubectl_json("get", "service", METRICS_SERVICE, "-n", SYSTEM_NAMESPACE)["spec"]
    (port,) = [p["port"] for p in service["ports"] if p["name"] == "metrics"]
    return f"{service['clusterIP']}:{port}"


def terminations_scraped(address: str, namespace: str) -> float | None:
    """pgwarden_actions_total for the idle-reaper's terminations in `namespace`, from one scrape through
    the Service (None when the replica that answered has no such series: the standby enforces nothing)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {
        "namespace": namespace,
        "policy": "idle-reaper",
        "rule": "idle",
        "action": SessionAction.TERMINATE.value,
        "mode": EnforcementAction.ENFORCE.value,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pgwarden_actions_total" and sample.labels == wanted:
                return float(sample.value)
    return None


@pytest.mark.parametrize("major", ["15", "18"])
def test_idle_sessions_on_a_statefulset_pod_are_reaped_with_status_and_events(namespace: str, major: str) -> None:
    host = start_postgres(namespace, major)
    apply(namespace, client_pod(namespace, host, 3))
    busy = psycopg.connect(host=host, user="app", password=APP_PASSWORD, dbname="postgres", application_name="web")
    busy.execute("SELECT 1")  # idle in transaction: not `idle`, so the rule must leave it alone
    try:
        doomed_pids = wait_for(
            lambda: client_sessions(host, namespace, 3),
            timeout=REAP_TIMEOUT,
            interval=0.5,
            message="the client pod's 3 idle sessions",
        )
        apply(namespace, credentials_secret(namespace), fast_idle_reaper(namespace))

        wait_for(
            lambda: not alive(host, doomed_pids), timeout=REAP_TIMEOUT, interval=0.5, message="idle sessions reaped"
        )
        assert alive(host, [busy.info.backend_pid]) == {busy.info.backend_pid}

        def terminated() -> int:
            return int(policy_totals(namespace).get("terminated", 0))

        wait_for(lambda: terminated() >= len(doomed_pids), timeout=60, interval=0.5, message="status.totals")
        assert terminated() == len(doomed_pids)

        def events() -> list[dict[str, Any]]:
            items = kubectl_json(
                "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=idle-reaper"
            )["items"]
            return [e for e in items if e["reason"] == EventReason.SESSIONS_TERMINATED]

        (event, *_) = wait_for(events, timeout=60, interval=0.5, message="a SessionsTerminated Event")
        assert event["type"] == "Normal"
        assert event["involvedObject"]["kind"] == "PostgresPolicy"

        # /metrics through the Service: each scrape lands on one replica; the enforcing one counts exactly
        # the sessions terminated, the standby has no series for the policy (never a second count).
        address = metrics_address()
        seen: list[float] = []

        def counted() -> bool:
            value = terminations_scraped(address, namespace)
            if value is not None:
                seen.append(value)
            return value is not None

        wait_for(counted, timeout=60, interval=0.5, message="pgwarden_actions_total through the Service")
        for _ in range(10):  # more scrapes, over both replicas: the count stays exact, no second counter
            counted()
        assert set(seen) == {float(len(doomed_pids))}
    finally:
        busy.close()
