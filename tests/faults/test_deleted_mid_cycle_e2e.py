"""A policy deleted while pgwarden is signalling 200 sessions: no signal after the deletion, and the
finalizer is gone within 20 s (real API server, operator subprocess, real PostgreSQL).

The signals are slowed by a relay standing at the pod's IP (5 ms each way, so 200 take over two seconds), and
the DELETE is sent once the server's log shows the first signals. Ground truth is the server's log against the
API server's deletionTimestamp (same machine, same clock; the timestamp has whole seconds, so the DELETE is
sent early in a second and a signal logged in that same second counts as before it).
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from kubernetes import client

from pgwarden.policy.api import GROUP, PLURAL, VERSION
from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.faults import Relay, Stopwatch, backend_of, frozen, rename, report_figures
from tests.harness.k8s import create_running_pod
from tests.harness.ledger import Ledger
from tests.harness.policies import (
    condition,
    create_policy,
    create_secret,
    get_policy,
    policy_body,
    policy_gone,
    prepare_server,
)
from tests.harness.postgres import free_port, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

_octets = itertools.count(10)
VICTIMS = 200


def early_in_a_second() -> bool:
    return time.time() % 1.0 < 0.2


def delete_policy(api: client.ApiClient, namespace: str, name: str) -> datetime:
    """DELETE it; the deletionTimestamp the API server set (the finalizer keeps the object for now)."""
    obj = cast(
        dict[str, Any],
        client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
    )
    stamp = (obj.get("metadata") or {}).get("deletionTimestamp")
    assert stamp, f"no deletionTimestamp in {obj.get('metadata')}"
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))


def test_a_policy_deleted_mid_cycle_signals_nothing_after_the_deletion(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    octet = next(_octets)
    server = pg_factory(host=f"127.0.{octet}.49", hba="password", ledger=True, settings={"max_connections": "300"})
    prepare_server(server)
    create_secret(k8s_api, namespace)
    relay_host = f"127.0.{octet}.50"
    with Relay(relay_host, free_port(relay_host), upstream=(server.host, server.port), delay=0.005) as relay:
        create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, relay_host)
        run_operator([namespace])
        limits = {"maxActionsPerCycle": 1000, "maxFractionPerCycle": 1.0}
        create_policy(
            k8s_api, namespace, policy_body("doomed", relay.port, state_age="0s", interval="2s", limits=limits)
        )

        def ready() -> bool:
            cond = condition(get_policy(k8s_api, namespace, "doomed"), "Ready")
            return cond is not None and cond["status"] == "True"

        wait_for(ready, timeout=60, message="Ready=True before the victims")
        parked = [server.open_session("idle", user="app", application_name="parked", via_socket=True)]
        parked += [
            server.open_session("idle", user="app", application_name="parked", via_socket=True)
            for _ in range(VICTIMS - 1)
        ]
        victims = {s.pid for s in parked}
        ledger = Ledger(server.logfile)
        with frozen(backend_of(server, "warden")):  # no cycle may see half of them: all become victims at once
            rename(parked, "web")
        wait_for(lambda: len(ledger.engine_signals()) >= 10, timeout=30, message="the first signals")
        wait_for(early_in_a_second, timeout=2, interval=0.005, message="the start of a second")
        clock = Stopwatch()
        requested = datetime.now(UTC).replace(tzinfo=None)  # the server's log is in UTC too (log_timezone)
        deleted_at = delete_policy(k8s_api, namespace, "doomed")
        wait_for(lambda: policy_gone(k8s_api, namespace, "doomed"), timeout=20, message="the finalizer to go")
        finalized = clock()
        signals = ledger.engine_signals()

    deleted_second = deleted_at.replace(tzinfo=None)
    after = [s for s in signals if s.at.replace(microsecond=0) > deleted_second]
    wrongly = [s for s in signals if s.pid not in victims]
    last = max(s.at for s in signals)
    # The log and the API server share a clock and a zone: the signals ran right up to the deletion.
    assert deleted_second - timedelta(seconds=2) <= last < deleted_second + timedelta(seconds=1)
    report_figures(
        "policy deleted mid-cycle",
        f"DELETE while signalling {VICTIMS} idle sessions (relay +5 ms each way)",
        detect_s=max(0.0, (last - requested).total_seconds()),  # from the DELETE to the last signal
        recover_s=finalized,
        wrongly_signalled=len(wrongly) + len(after),
    )
    print(f"signalled before the deletion: {len(signals) - len(after)}/{VICTIMS}, after: {len(after)}")
    print(f"last signal {(last - requested).total_seconds() * 1000:.0f} ms after the DELETE was sent")
    assert len(signals) < VICTIMS, "the deletion must land in the middle of the signalling"
    assert after == [], f"signalled after the deletion ({deleted_at}): {[(s.pid, s.at) for s in after]}"
    assert wrongly == []
