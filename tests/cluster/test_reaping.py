"""pgwarden, as deployed, reaps idle sessions on a PostgreSQL pod of a StatefulSet on the real node.

Everything is real: the PostgreSQL image runs under the kubelet, pgwarden reaches it on its pod IP over
the pod network and reads the credentials Secret with its ServiceAccount token.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgwarden.policy.api import EventReason
from tests.cluster.conftest import kubectl_json
from tests.cluster.postgres_pod import (
    APP_PASSWORD,
    REAP_TIMEOUT,
    alive,
    apply,
    credentials_secret,
    fast_idle_reaper,
    open_idle,
    pids,
    policy_totals,
    start_postgres,
)
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("major", ["15", "18"])
def test_idle_sessions_on_a_statefulset_pod_are_reaped_with_status_and_events(namespace: str, major: str) -> None:
    host = start_postgres(namespace, major)
    doomed = open_idle(host, 3)
    busy = psycopg.connect(host=host, user="app", password=APP_PASSWORD, dbname="postgres", application_name="web")
    busy.execute("SELECT 1")  # idle in transaction: not `idle`, so the rule must leave it alone
    try:
        doomed_pids = pids(doomed)
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
    finally:
        busy.close()
        for conn in doomed:
            conn.close()
