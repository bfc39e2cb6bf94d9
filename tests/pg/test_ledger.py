"""The ledger reads the server's log right: the ground truth the invariant tests compare pgwarden with."""

from __future__ import annotations

import pytest

from tests.harness.engine import unique
from tests.harness.ledger import Ledger
from tests.harness.postgres import PgServer, wait_for

pytestmark = pytest.mark.pg


def test_ledger_names_who_terminated_whom(pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    victim = pg.open_session("idle", application_name=app)
    bystander = pg.open_session("idle", application_name=app)
    with pg.connect(application_name="killer") as conn:
        killer = conn.info.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (victim.pid,))
    pg.wait_gone(victim.pid)
    ledger.wait_effects([victim.pid])
    assert ledger.terminated() == [victim.pid]
    [effect] = ledger.effects()
    assert (effect.user, effect.application) == ("postgres", app)
    signals = [s for s in ledger.signals() if s.pid in (victim.pid, bystander.pid)]
    assert [(s.by_pid, s.by_application, s.action, s.pid) for s in signals] == [
        (killer, "killer", "terminate", victim.pid)
    ]
    ledger.wait_disconnected([victim.pid])
    assert bystander.pid not in ledger.disconnected()


def test_ledger_sees_cancels_and_literal_pids(pg: PgServer, ledger: Ledger, request: pytest.FixtureRequest) -> None:
    busy = pg.open_session("active", application_name=unique(request))
    with pg.connect(application_name="canceller") as conn:
        conn.execute(f"SELECT pg_cancel_backend({busy.pid})")  # a literal, as psql users write it
    wait_for(lambda: pg.state_of(busy.pid) == "idle", message="the cancelled query to end")
    ledger.wait_effects([busy.pid], action="cancel")
    assert ledger.cancelled() == [busy.pid]
    assert ledger.terminated() == []
    assert [(s.by_application, s.action, s.pid) for s in ledger.signals()] == [("canceller", "cancel", busy.pid)]
