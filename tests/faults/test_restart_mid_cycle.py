"""PostgreSQL restarted while pgwarden is signalling: every signal PostgreSQL accepted before the restart is
reported, nothing else was signalled, and the next cycle reconnects and goes on.

The fault: a `pgwarden enforce` loop terminating 120 idle sessions through a relay that adds 5 ms each way (so
signalling takes over a second), and `pg_ctl restart -m fast` on the same port as soon as the server's log
shows the first signals. Ground truth is the server's log (tests.harness.ledger), not pgwarden's report.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pgwarden.policy.api import SkipReason
from tests.fixtures.postgres import PgFactory
from tests.harness.cli import CliLoop
from tests.harness.engine import unique
from tests.harness.faults import Relay, Stopwatch, frozen, report_figures
from tests.harness.ledger import ENGINE_APPLICATION, Ledger
from tests.harness.postgres import PgServer, Session, free_port, wait_for

pytestmark = pytest.mark.pg

_octets = itertools.count(10)
VICTIMS = 120
LATER_VICTIMS = 5


def next_host() -> str:
    return f"127.0.{next(_octets)}.46"


def terminate_policy(tmp_path: Path, app: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"""
apiVersion: pgwarden.dev/v1alpha1
kind: PostgresPolicy
metadata: {{name: restart, namespace: default}}
spec:
  selector: {{matchLabels: {{app: postgres}}}}
  interval: 2s
  limits: {{maxActionsPerCycle: 1000, maxFractionPerCycle: 1.0}}
  sessions:
    - name: idle
      action: terminate
      states: [idle]
      stateAge: 0s
      applicationNames: ["{app}"]
"""
    )
    return path


@pytest.fixture
def loop() -> Iterator[list[CliLoop]]:
    started: list[CliLoop] = []
    yield started
    for each in started:
        if each.proc.poll() is None:
            each.stop()


def rename(sessions: list[Session], app: str) -> None:
    """Make parked sessions victims (application_name is what the rule matches)."""
    for session in sessions:
        session.conn.execute("SELECT pg_catalog.set_config('application_name', %s, false)", (app,))


def engine_backend(server: PgServer) -> int:
    rows = server.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (ENGINE_APPLICATION,))
    assert len(rows) == 1, rows
    return int(rows[0][0])


def ready_times(ledger: Ledger) -> list[datetime]:
    return [e.at for e in ledger.entries() if e.message.startswith("database system is ready to accept connections")]


def done_pids(reports: list[dict[str, Any]]) -> list[int]:
    return [a["pid"] for r in reports for a in r["actions"] if a["done"]]


def unknown_pids(reports: list[dict[str, Any]]) -> set[int]:
    """Sessions whose signal was in flight when the connection broke: reported as such (delivery unknown)."""
    return {s["pid"] for r in reports for s in r["skipped"] if s["reason"] == SkipReason.FAILED}


def test_postgresql_restarted_while_signalling_loses_no_action_and_the_loop_goes_on(
    pg_factory: PgFactory, tmp_path: Path, request: pytest.FixtureRequest, loop: list[CliLoop]
) -> None:
    server = pg_factory(host=next_host(), ledger=True, settings={"max_connections": "300"})
    app = unique(request)
    relay_host = next_host()
    with Relay(relay_host, free_port(relay_host), upstream=(server.host, server.port), delay=0.005) as relay:
        ledger = Ledger(server.logfile)
        dsn = f"host={relay_host} port={relay.port} user=postgres dbname=postgres"
        loop.append(CliLoop(dsn, terminate_policy(tmp_path, app)))
        cli = loop[0]
        wait_for(cli.poll, timeout=30, message="the loop's first (empty) cycle")  # the loop is past its first cycle
        parked = [server.open_session("idle", application_name="parked") for _ in range(VICTIMS)]
        victims = {s.pid for s in parked}
        with frozen(engine_backend(server)):  # no cycle may see half of them: all become victims at once
            rename(parked, app)

        wait_for(lambda: len(ledger.engine_signals()) >= 5, timeout=30, message="pgwarden's first signals")
        clock = Stopwatch()
        server.stop("fast")
        server.start()
        started = clock()
        seen = len(cli.poll())

        def interrupted() -> bool:
            return any("lost" in e for r in cli.poll() for e in r["errors"])

        wait_for(interrupted, timeout=30, message="the interrupted cycle's report")
        detected = clock()
        wait_for(lambda: any(not r["errors"] for r in cli.poll()[seen:]), timeout=60, message="a clean cycle")
        recovered = clock() - started
        pre_restart = list(cli.poll())

        later = [server.open_session("idle", application_name=app) for _ in range(LATER_VICTIMS)]
        later_pids = {s.pid for s in later}
        wait_for(lambda: later_pids <= set(done_pids(cli.poll())), timeout=30, message="the later victims' reports")

    restarted_at = ready_times(ledger)[-1]
    before = [s for s in ledger.engine_signals() if s.at < restarted_at]
    signalled = {s.pid for s in before}
    reported = done_pids([r for r in pre_restart if victims & {a["pid"] for a in r["actions"]}])
    unknown = unknown_pids(pre_restart) & victims
    wrongly = signalled - victims
    lost = signalled - set(reported) - unknown
    report_figures(
        "PostgreSQL restarted mid-cycle",
        f"pg_ctl restart -m fast while signalling {VICTIMS} idle sessions (relay +5 ms each way)",
        detect_s=detected,
        recover_s=recovered,
        wrongly_signalled=len(wrongly),
        actions_lost=len(lost),
    )
    in_flight = len(unknown)
    print(f"before the restart: {len(signalled)}/{VICTIMS} signalled, {len(reported)} reported, {in_flight} in flight")
    assert 0 < len(signalled) < VICTIMS, "the restart must land in the middle of the signalling"
    assert wrongly == set()
    assert lost == set(), f"accepted by PostgreSQL, never reported: {sorted(lost)}"
    assert len(reported) == len(set(reported))  # each once
    assert set(reported) <= signalled  # nothing reported that the server's log does not show
    assert len(unknown) <= 1  # at most the one statement in flight
    after = [s for s in ledger.engine_signals() if s.at >= restarted_at]
    assert {s.pid for s in after} == later_pids  # it went on, and only with the sessions created since
    ledger.wait_effects(later_pids)
