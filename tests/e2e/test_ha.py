"""High availability: two `pgwarden run` replicas at once, and only one of them enforces.

The replicas peer through kopf's peering (manifests/peering/): each keeps a record with a random priority
in the namespace's `KopfPeering` named `pgwarden`, and a replica that sees a live peer with a higher
priority pauses: no watch, no daemon, no connection to PostgreSQL. Peering is mandatory, so kopf starts
paused and resumes only when its first look at the peering object shows no higher peer (see
`OperatorProcess.paused`). When the active replica goes away, the other resumes and enforces:
- stopped cleanly (SIGTERM), kopf deletes its own record on the way out, so the take-over is immediate;
- killed (SIGKILL), the record stays until its `lifetime` (kopf's default, 60 s) runs out.

Which replica wins is random (the priorities are); the tests find out from the peering records and the
logs, then prove it from each replica's own /metrics and from PostgreSQL. Every wait polls with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy.api import EventReason
from tests.fixtures.operator import OperatorFactory, OperatorProcess, kopf_peers
from tests.fixtures.postgres import PgFactory
from tests.harness.k8s import create_running_pod
from tests.harness.pgbinaries import e2e_versions
from tests.harness.policies import (
    create_policy,
    create_secret,
    events,
    next_host,
    open_app_sessions,
    policy_body,
    prepare_server,
    terminated_total,
)
from tests.harness.postgres import PgServer, holds_for, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]


def actions_total(replica: OperatorProcess, namespace: str, policy: str) -> float:
    """Sessions this replica terminated for the policy, from its own /metrics (0 if it never acted)."""
    pattern = re.compile(
        r'^pgwarden_actions_total\{action="terminate",mode="enforce",namespace="'
        + re.escape(namespace)
        + r'",policy="'
        + re.escape(policy)
        + r'",rule="idle"\} ([0-9.e+]+)$',
        re.MULTILINE,
    )
    return sum(float(m) for m in pattern.findall(replica.metrics()))


def targets_series(replica: OperatorProcess, namespace: str, policy: str) -> bool:
    """True once the policy's daemon ran in this replica (it sets pgwarden_targets on its first step)."""
    return f'pgwarden_targets{{namespace="{namespace}",policy="{policy}"}}' in replica.metrics()


def settle(
    api: client.ApiClient, namespace: str, replicas: dict[str, OperatorProcess]
) -> tuple[OperatorProcess, OperatorProcess]:
    """Wait until both replicas (by identity) have a peering record and exactly the one with the lower
    priority is paused; return (active, standby)."""

    def settled() -> tuple[OperatorProcess, OperatorProcess] | None:
        peers = kopf_peers(api, namespace)
        if set(peers) != set(replicas):
            return None
        ranked = sorted(replicas, key=lambda identity: int(peers[identity]["priority"]))
        standby, active = replicas[ranked[0]], replicas[ranked[1]]
        if standby.paused() and not active.paused():
            return active, standby
        return None

    result: tuple[OperatorProcess, OperatorProcess] = wait_for(
        settled, timeout=60, interval=0.2, message="one replica to pause"
    )
    return result


@pytest.fixture
def target(pg_factory: PgFactory) -> PgServer:
    server = pg_factory(host=next_host(), hba="password")
    prepare_server(server)
    return server


def start_pair(
    api: client.ApiClient, namespace: str, target: PgServer, run_operator: OperatorFactory
) -> tuple[OperatorProcess, OperatorProcess]:
    """A pod to enforce on, its credentials, and two replicas that have agreed which one is active."""
    create_secret(api, namespace)
    create_running_pod(api, namespace, "db-0", {"app": "pg"}, target.host)
    replicas = {name: run_operator([namespace], peering=True, env={"POD_NAME": name}) for name in ("ha-a", "ha-b")}
    return settle(api, namespace, replicas)


def active_record(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    """The active replica's peering record: the one with the higher priority (the standby paused for it)."""
    return dict(max(kopf_peers(api, namespace).values(), key=lambda peer: int(peer["priority"])))


def expiry(record: dict[str, Any]) -> datetime:
    """When peers stop believing in the record's owner, unless it renews the record first."""
    return datetime.fromisoformat(record["lastseen"]) + timedelta(seconds=int(record["lifetime"]))


def seconds_left(record: dict[str, Any]) -> float:
    return (expiry(record) - datetime.now(UTC)).total_seconds()


def enforced_by(active: OperatorProcess, standby: OperatorProcess, namespace: str) -> Callable[[], bool]:
    return lambda: actions_total(active, namespace, "reaper") > 0 and actions_total(standby, namespace, "reaper") == 0


def test_only_one_replica_enforces_and_the_other_takes_over_on_sigterm(
    kopf_peering: str,
    k8s_api: client.ApiClient,
    namespace: str,
    target: PgServer,
    run_operator: OperatorFactory,
) -> None:
    active, standby = start_pair(k8s_api, namespace, target, run_operator)
    create_policy(k8s_api, namespace, policy_body("reaper", target.port))
    doomed = open_app_sessions(target, 3)
    for pid in doomed:
        target.wait_gone(pid, timeout=30)

    # The active replica did it; the paused one never even started the policy's daemon.
    wait_for(enforced_by(active, standby, namespace), timeout=10, message="the active replica's action metrics")
    assert actions_total(active, namespace, "reaper") == len(doomed)
    assert targets_series(active, namespace, "reaper")
    assert holds_for(lambda: not targets_series(standby, namespace, "reaper"), 3)
    assert not active.paused()
    wait_for(
        lambda: any(e.reason == EventReason.SESSIONS_TERMINATED for e in events(k8s_api, namespace, "reaper")),
        timeout=10,
        message="a SessionsTerminated Event",
    )

    # Each session counted once: one enforcer (read from the status, not from the Events' wording).
    wait_for(
        lambda: terminated_total(k8s_api, namespace, "reaper") >= len(doomed),
        timeout=10,
        message="status totals counting the terminations",
    )
    assert terminated_total(k8s_api, namespace, "reaper") == len(doomed)

    # A clean stop removes the active replica's peering record, and the standby resumes at once.
    active.stop()
    wait_for(lambda: len(kopf_peers(k8s_api, namespace)) == 1, timeout=10, message="the stopped replica's record gone")
    wait_for(lambda: not standby.paused(), timeout=30, message="the standby to resume")
    later = open_app_sessions(target, 2)
    for pid in later:
        target.wait_gone(pid, timeout=30)
    wait_for(
        lambda: actions_total(standby, namespace, "reaper") == len(later), timeout=10, message="the standby's actions"
    )


# Peering does not depend on the PostgreSQL version, and this test waits out a peering lifetime: one major.
@pytest.mark.parametrize("pg_major", e2e_versions()[:1], ids=lambda v: f"pg{v}")
def test_the_standby_takes_over_when_the_active_replica_is_killed(
    kopf_peering: str,
    k8s_api: client.ApiClient,
    namespace: str,
    target: PgServer,
    run_operator: OperatorFactory,
) -> None:
    active, standby = start_pair(k8s_api, namespace, target, run_operator)
    create_policy(k8s_api, namespace, policy_body("reaper", target.port))
    doomed = open_app_sessions(target, 2)
    for pid in doomed:
        target.wait_gone(pid, timeout=30)
    wait_for(enforced_by(active, standby, namespace), timeout=10, message="the active replica's action metrics")

    # SIGKILL: no goodbye. The killed replica's record stays until `lastseen + lifetime`. Kill it while that
    # is far enough away to show the gap (keep-alives renew it every 50-55 s).
    wait_for(lambda: seconds_left(active_record(k8s_api, namespace)) > 30, timeout=70, message="a fresh keep-alive")
    expires = expiry(active_record(k8s_api, namespace))
    os.killpg(active.proc.pid, signal.SIGKILL)
    active.proc.wait(timeout=10)
    orphan = open_app_sessions(target, 1)[0]
    # Nobody enforces until the record expires (a few seconds of margin for the hold's own polling)...
    until_expiry = (expires - datetime.now(UTC)).total_seconds()
    assert holds_for(lambda: target.alive(orphan) and standby.paused(), until_expiry - 3)
    # ...then the standby resumes, drops the dead record and reaps the session that waited meanwhile.
    wait_for(lambda: not standby.paused(), timeout=30, message="the standby to resume")
    wait_for(lambda: len(kopf_peers(k8s_api, namespace)) == 1, timeout=10, message="the dead record cleaned up")
    target.wait_gone(orphan, timeout=30)
    wait_for(lambda: actions_total(standby, namespace, "reaper") == 1, timeout=10, message="the standby's action")
