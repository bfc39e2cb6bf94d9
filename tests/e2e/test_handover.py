"""Handing a pod between its sidecar and the controller, both ways: never both signalling, by the server's log.

One pod, its PostgreSQL (logging for the ledger), its sidecar (engine connections named `pgwarden`) and the
controller (named `pgwarden/handover-ctl` after its identity). A feeder keeps an idle victim waiting at all
times under an idle rule that takes it at once, so whoever may act does act, within a second. Each handover
flips the pod's `pgwarden.dev/enforcer` annotation and waits until the new owner has signalled twice; the
ledger, read in order, must then be exactly one run of signals per owner: every signal of the old owner
before the first of the new one, and none after, twenty times each way. The grace is shortened for the
test (PGWARDEN_HANDOVER_GRACE=3); the sidecar's poll is the default 5 s, with which the code before the
handover rule showed both owners signalling in turn within 0.4-0.6 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.e2e.test_sidecar import SIDECAR, sidecar_identity
from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import create_running_pod
from tests.harness.ledger import Ledger, Signal
from tests.harness.pgbinaries import selected_versions
from tests.harness.policies import (
    PASSWORD,
    create_policy,
    create_secret,
    next_host,
    open_app_sessions,
    policy_body,
    prepare_server,
)
from tests.harness.postgres import PgServer, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

HANDOVERS = 20  # each way
GRACE = "3"
# Both directions' grace; the sidecar polls at its default 5 s: it re-reads its pod before acting.
FAST = {"PGWARDEN_HANDOVER_GRACE": GRACE, "PGWARDEN_SIDECAR_RELEASE_GRACE": GRACE}
CONTROLLER_APP = "pgwarden/handover-ctl"
SIDECAR_APP = "pgwarden"


@pytest.fixture
def server(pg_factory: PgFactory) -> PgServer:
    target = pg_factory(host=next_host(), hba="password", ledger=True)
    prepare_server(target)
    return target


def annotate(api: client.ApiClient, namespace: str, sidecar: bool) -> None:
    value = SIDECAR["pgwarden.dev/enforcer"] if sidecar else None
    client.CoreV1Api(api).patch_namespaced_pod(
        "db-0", namespace, {"metadata": {"annotations": {"pgwarden.dev/enforcer": value}}}
    )


def signals_by(ledger: Ledger, application: str) -> list[Signal]:
    return [s for s in ledger.signals() if s.by_application == application]


def hand_over(api: client.ApiClient, namespace: str, server: PgServer, to_sidecar: bool) -> float:
    """Flip the annotation and wait until the new owner has signalled twice; return the seconds to its first."""
    new = SIDECAR_APP if to_sidecar else CONTROLLER_APP
    ledger = Ledger(server.logfile)
    began = time.monotonic()
    annotate(api, namespace, to_sidecar)
    wait_for(lambda: signals_by(ledger, new), timeout=60, interval=0.05, message=f"{new} to act")
    took = time.monotonic() - began
    wait_for(lambda: len(signals_by(ledger, new)) >= 2, timeout=30, interval=0.1, message=f"{new} to act again")
    return took


def owner_runs(ledger: Ledger) -> list[tuple[str, float]]:
    """The signals in log order, grouped into runs of one sender: (sender, seconds since the previous run)."""
    runs: list[tuple[str, float]] = []
    last: Signal | None = None
    for signal_ in ledger.signals():
        if last is None or signal_.by_application != last.by_application:
            gap = (signal_.at - last.at).total_seconds() if last is not None else 0.0
            runs.append((signal_.by_application, gap))
        last = signal_
    return runs


@pytest.mark.parametrize("pg_major", selected_versions()[:1], ids=lambda v: f"pg{v}")
def test_sidecar_and_controller_hand_over_without_overlap(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    server: PgServer,
    run_operator: OperatorFactory,
    run_sidecar: Callable[..., Any],
    tmp_path: Path,
) -> None:
    kubeconfig = sidecar_identity(control_plane, namespace, tmp_path)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host, annotations=SIDECAR)
    create_policy(k8s_api, namespace, policy_body("reaper", server.port, state_age="0s", interval="1s"))
    run_operator([namespace], env={"POD_NAME": "handover-ctl", **FAST})
    run_sidecar(kubeconfig, namespace, "db-0", server.dsn("warden", password=PASSWORD), env=FAST)
    ledger = Ledger(server.logfile)
    open_app_sessions(server, 1)
    wait_for(lambda: signals_by(ledger, SIDECAR_APP), timeout=60, message="the sidecar to act first")

    stop = threading.Event()

    def feed() -> None:  # an idle victim arrives every 0.2 s: whoever may act, acts
        while not stop.wait(0.2):
            open_app_sessions(server, 1)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    times: dict[str, list[float]] = {"to-controller": [], "to-sidecar": []}
    try:
        for _ in range(HANDOVERS):
            for to_sidecar in (False, True):
                took = hand_over(k8s_api, namespace, server, to_sidecar)
                times["to-sidecar" if to_sidecar else "to-controller"].append(round(took, 1))
    finally:
        stop.set()
        thread.join(timeout=10)
    # One run of signals per owner and handover: a late signal of an old owner after its successor began
    # would split a run (sidecar, controller, sidecar, controller ... with an extra alternation).
    runs = owner_runs(ledger)
    expected = [SIDECAR_APP] + [CONTROLLER_APP, SIDECAR_APP] * HANDOVERS
    assert [sender for sender, _gap in runs] == expected, runs
    gaps = [round(gap, 2) for _sender, gap in runs[1:]]
    print(f"handover seconds: {times}; gaps between owners' signals (s): min {min(gaps)}, {gaps}")
