"""Two replicas started at the same moment: at most one ever signals, by PostgreSQL's own log.

Each replica names itself (POD_NAME, as the Deployment's downward API does) and its engine connections carry
that name (`pgwarden/<identity>`), so the server's log tells which replica sent every `pg_terminate_backend`.
Four idle victims wait before the replicas start, under an idle rule that takes them at once: a replica that
resumed before seeing its peer would signal them within its first cycle. Twenty repetitions on one control
plane and one PostgreSQL; only the replicas are restarted.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.fixtures.operator import OperatorProcess, kopf_peers
from tests.fixtures.postgres import PgFactory
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import create_running_pod
from tests.harness.ledger import Ledger
from tests.harness.pgbinaries import selected_versions
from tests.harness.policies import (
    create_policy,
    create_secret,
    next_host,
    open_app_sessions,
    policy_body,
    prepare_server,
)
from tests.harness.postgres import PgServer, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

REPETITIONS = 20
SETTLE_SECONDS = "2"
"""PGWARDEN_PEERING_SETTLE for these replicas: watch latency on a local API server is milliseconds."""


def start_replica(kubeconfig: Path, namespace: str, name: str, logdir: Path) -> OperatorProcess:
    env = {"POD_NAME": name, "PGWARDEN_PEERING_SETTLE": SETTLE_SECONDS}
    return OperatorProcess(kubeconfig, [namespace], logdir, env=env)


def stop_all(replicas: list[OperatorProcess]) -> None:
    """SIGTERM to every replica at once, then wait for each (a clean stop removes its peering record)."""
    for replica in replicas:
        if replica.proc.poll() is None:
            replica.proc.send_signal(signal.SIGTERM)
    for replica in replicas:
        try:
            replica.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            replica.stop()  # SIGKILL after its own wait
        replica.stop()


def senders(ledger: Ledger) -> set[str]:
    """The application_name of every connection that sent a signalling statement since the ledger began."""
    return {signal_.by_application for signal_ in ledger.signals()}


def higher(api: client.ApiClient, namespace: str) -> str:
    """The identity with the highest priority in the peering object: the one that may act."""
    peers = kopf_peers(api, namespace)
    return max(peers, key=lambda identity: int(peers[identity]["priority"]))


def start_together(
    api: client.ApiClient, kubeconfig: Path, namespace: str, server: PgServer, rep: int, logdir: Path
) -> set[str]:
    """One repetition: victims waiting, two replicas started at once; return who signalled, by the ledger."""
    ledger = Ledger(server.logfile)
    victims = open_app_sessions(server, 4)
    names = [f"start{rep}-a", f"start{rep}-b"]
    replicas = dict(zip(names, [start_replica(kubeconfig, namespace, name, logdir) for name in names], strict=True))
    try:
        for pid in victims:
            server.wait_gone(pid, timeout=60)
        # Both records are in the peering object and the lower-priority replica is paused (kopf stopped or
        # never started its loops): from here on it cannot act, so the window in question is closed.
        wait_for(lambda: set(kopf_peers(api, namespace)) == set(names), timeout=30, message="both records")
        winner = higher(api, namespace)
        (loser,) = set(names) - {winner}
        wait_for(replicas[loser].paused, timeout=30, message="the lower-priority replica paused")
        ledger.wait_effects(victims)
        sent_by = senders(ledger)
        assert sent_by == {f"pgwarden/{winner}"}, (rep, sent_by, winner)
        return sent_by
    except BaseException:
        for replica in replicas.values():
            print(f"--- {replica.log_path} ---\n{replica.logs()[-6000:]}")
        raise
    finally:
        stop_all(list(replicas.values()))
        wait_for(lambda: not kopf_peers(api, namespace), timeout=30, message="the records removed on stop")


# Peering does not depend on the PostgreSQL version: one major.
@pytest.mark.parametrize("pg_major", selected_versions()[:1], ids=lambda v: f"pg{v}")
def test_replicas_started_together_never_both_signal(
    kopf_peering: str,
    k8s_api: client.ApiClient,
    control_plane: ControlPlane,
    namespace: str,
    pg_factory: PgFactory,
    tmp_path: Path,
) -> None:
    server: PgServer = pg_factory(host=next_host(), hba="password", ledger=True)
    prepare_server(server)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    create_policy(k8s_api, namespace, policy_body("reaper", server.port, state_age="0s"))

    durations: list[float] = []
    for rep in range(REPETITIONS):
        began = time.monotonic()
        start_together(k8s_api, control_plane.kubeconfig, namespace, server, rep, tmp_path)
        durations.append(round(time.monotonic() - began, 1))
    print(f"simultaneous starts: {REPETITIONS}/{REPETITIONS} with one enforcer; seconds per repetition: {durations}")
