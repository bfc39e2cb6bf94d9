"""An API server stall never stops database enforcement (issue 12, item 4).

A dedicated etcd + kube-apiserver (the shared one must not be frozen under other tests) and a real
operator enforcing an idle rule on a real PostgreSQL. Then one of the two is stopped with SIGSTOP for
longer than a minute: kube-apiserver (requests hang), or etcd (the API server answers, slowly, with
errors). Meanwhile new idle sessions keep appearing and must keep being terminated, with the Secret's
cached credentials long expired (the last good ones are used); /healthz must stay up; once the component
is thawed, status must catch up with exactly what the server's own log says was terminated.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.operator import OperatorProcess, apply_crds
from tests.fixtures.postgres import PgFactory
from tests.harness.controlplane import ControlPlane
from tests.harness.faults import Stopwatch, frozen, report_figures
from tests.harness.k8s import create_running_pod, new_namespace
from tests.harness.ledger import Ledger
from tests.harness.pgbinaries import e2e_versions
from tests.harness.policies import (
    condition,
    create_policy,
    create_secret,
    get_policy,
    open_app_sessions,
    policy_body,
    prepare_server,
    terminated_total,
)
from tests.harness.postgres import wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

_octets = itertools.count(10)
WAVES = 4  # bursts of idle sessions during the stall, ~15 s apart
PER_WAVE = 3


@pytest.fixture(scope="module")
def own_plane() -> Iterator[ControlPlane]:
    with ControlPlane() as plane:
        with plane.api_client() as api:
            apply_crds(api)
        yield plane


# An API stall does not depend on the PostgreSQL version, and each case waits out more than a minute: one major.
@pytest.mark.parametrize("pg_major", e2e_versions()[:1], ids=lambda v: f"pg{v}")
@pytest.mark.parametrize(("component", "seconds"), [("kube-apiserver", 65.0), ("etcd", 70.0)])
def test_enforcement_goes_on_through_an_api_stall_and_status_catches_up(
    own_plane: ControlPlane, pg_factory: PgFactory, tmp_path: Path, component: str, seconds: float
) -> None:
    server = pg_factory(host=f"127.0.{next(_octets)}.61", hba="password", ledger=True)
    prepare_server(server)
    ledger = Ledger(server.logfile)
    with own_plane.api_client() as api:
        namespace = new_namespace(api, "stall")
        create_secret(api, namespace)
        create_running_pod(api, namespace, "db-0", {"app": "pg"}, server.host)
        operator = OperatorProcess(
            own_plane.kubeconfig,
            [namespace],
            tmp_path,
            ["--standalone"],
            # The Secret's cache entry expires early in the stall: the last good credentials must carry on.
            env={"PGWARDEN_SECRET_CACHE_TTL": "5", "PGWARDEN_API_TIMEOUT": "3"},
        )
        try:
            wait_for(operator.healthy, timeout=60, message="operator healthz")
            create_policy(api, namespace, policy_body("stall", server.port, state_age="1s"))
            first = open_app_sessions(server, 2)
            wait_for(lambda: terminated_total(api, namespace, "stall") == 2, timeout=60, message="first cycle")
            for pid in first:
                server.wait_gone(pid)

            victims: list[int] = []
            reaped_in: list[float] = []
            clock = Stopwatch()
            with frozen(own_plane.pids[component]):
                for wave in range(WAVES):
                    opened = time.monotonic()
                    pids = open_app_sessions(server, PER_WAVE)
                    victims += pids
                    for pid in pids:  # stateAge 1 s + interval 5 s + margin: a working enforcer, API or not
                        server.wait_gone(pid, timeout=15)
                    reaped_in.append(time.monotonic() - opened)
                    assert operator.healthy(), f"/healthz failed {clock():.0f} s into the {component} stall"
                    if wave < WAVES - 1:
                        next_wave = (wave + 1) * seconds / WAVES
                        wait_for(lambda: clock() >= next_wave, timeout=seconds, interval=0.5)  # noqa: B023
                wait_for(lambda: clock() >= seconds, timeout=seconds, interval=0.5, message="the stall's end")
            stalled_for = clock()
            thawed = Stopwatch()
            expected = 2 + len(victims)
            wait_for(
                lambda: terminated_total(api, namespace, "stall") == expected,
                timeout=90,
                interval=0.5,
                message="status totals to catch up after the stall",
            )
            caught_up = thawed()
            ledger.assert_agrees([*first, *victims])
            wrongly = [s.pid for s in ledger.engine_signals() if s.pid not in {*first, *victims}]
            assert wrongly == []
            policy = get_policy(api, namespace, "stall")
            ready = condition(policy, "Ready")
            assert ready is not None
            assert ready["status"] == "True"
            assert operator.proc.poll() is None
            logs = operator.logs()
            assert "Traceback" not in logs
            assert "failed with an exception" not in logs  # kopf's words when a daemon crashes into its backoff
        finally:
            operator.stop()
            print(f"--- operator log ---\n{operator.logs()[-6000:]}")
    report_figures(
        f"{component} stopped {stalled_for:.0f} s",
        f"SIGSTOP {component} (dedicated control plane) while sessions go idle",
        detect_s=max(reaped_in),
        recover_s=caught_up,
        wrongly_signalled=len(wrongly),
        actions_lost=0,  # asserted above: status totals equal the server log's terminations
    )
