"""`pgwarden drain` without a server: the exact-name match, the spec it evaluates, its report, and the README's
policy form of the same ("kill all connections to a database")."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
import yaml

from pgwarden.cli.drain import render_text
from pgwarden.engine.decide import plan
from pgwarden.engine.drain import (
    BLAST_RADIUS_NOTE,
    DRAIN_RULE,
    DrainReport,
    RemainingSession,
    classify,
    drain_spec,
    literal_glob,
)
from pgwarden.engine.patterns import anchored_alternation, glob_to_like, matches_any
from pgwarden.engine.types import Observation, ObservedSession
from pgwarden.policy import parse_spec
from pgwarden.policy.api import Untouched
from pgwarden.policy.model import SessionAction
from tests.harness.policy_corpus import REPO, load_examples
from tests.harness.reports import action

STARTED = datetime(2026, 1, 1, tzinfo=UTC)


def session(pid: int, *, user: str = "app", database: str = "shop", application: str = "web") -> ObservedSession:
    return ObservedSession(
        pid=pid,
        user=user,
        database=database,
        application_name=application,
        client_address="10.0.0.7",
        state="idle",
        backend_start=STARTED,
        state_change=STARTED,
        state_age=1.0,
        query_age=1.0,
        transaction_age=None,
        connection_age=1.0,
    )


def observation(*sessions: ObservedSession) -> Observation:
    return Observation(
        server_version="18.1",
        own_pid=1,
        backends={"client backend": len(sessions) + 1},
        client_states={"idle": len(sessions)},
        sessions=sessions,
        next_crossing=None,
        own_roles=("postgres", "postgres"),
    )


@pytest.mark.parametrize("name", ["shop", "sho?", "s*p", "shop[1]", "a_b%c", "x\\y", "[!z]", "ü-db"])
def test_a_database_name_matches_itself_and_nothing_else(name: str) -> None:
    pattern = literal_glob(name)
    assert matches_any(name, [pattern])
    for other in ("shop", "shop_archive", "sho", "s", "shopx", "a_bXc", "xy", "z", "[z]"):
        if other != name:
            assert not matches_any(other, [pattern]), other
    # The observation statement matches it with a regex (a name with a set is never a LIKE pattern); a
    # PostgreSQL ARE and Python read these escaped literals alike. tests/pg/test_cli_drain.py runs it for real.
    assert glob_to_like(pattern) is None or pattern == name
    regex = anchored_alternation([pattern])
    assert regex is not None
    assert re.fullmatch(regex, name)
    assert not re.fullmatch(regex, name + "x")


def test_the_spec_selects_every_session_on_the_database_with_limits_wide_open() -> None:
    spec = drain_spec("shop", ["reporter", "etl-*"])
    (rule,) = spec.sessions
    assert rule.name == DRAIN_RULE
    assert rule.action is SessionAction.TERMINATE
    assert rule.states == []
    assert rule.connection_age is not None
    assert rule.connection_age.total_seconds() == 0
    assert spec.exclude.users == ["reporter", "etl-*"]
    sessions = [session(pid) for pid in range(10, 410)]
    elsewhere = session(500, database="shop_archive")
    excluded = session(501, user="etl-nightly")
    own = session(502, user="postgres", application="pgwarden-sidecar")
    decision = plan(observation(*sessions, elsewhere, excluded, own), spec)
    assert [p.session.pid for p in decision.actions] == list(range(10, 410))  # 400 in one round: no cap
    assert decision.skipped == ()


def test_classify_names_why_a_session_is_left_alone() -> None:
    spec = drain_spec("shop", ["reporter"])
    roles = ("postgres", "postgres")
    assert classify(session(2), spec.exclude, roles) is None
    assert classify(session(2, user="reporter"), spec.exclude, roles) is Untouched.EXCLUDED
    assert classify(session(2, user="postgres", application="pgwarden"), spec.exclude, roles) is Untouched.OWN
    # Another role that calls itself pgwarden is not pgwarden.
    assert classify(session(2, application="pgwarden"), spec.exclude, roles) is None
    superuser = ObservedSession(**{**session(2).__dict__, "permitted": False})
    assert classify(superuser, spec.exclude, roles) is Untouched.NOT_PERMITTED
    walsender = ObservedSession(**{**session(2).__dict__, "backend_type": "walsender"})
    assert classify(walsender, spec.exclude, roles) is Untouched.NOT_CLIENT_BACKEND


def _report(*, drained: bool, dry_run: bool = False) -> DrainReport:
    report = DrainReport(database="shop", target="db:5432", dry_run=dry_run, timeout_seconds=60.0)
    report.server_version = "18.1"
    report.drained = drained
    report.rounds = 2
    report.actions = [action(42, rule=DRAIN_RULE, done=not dry_run)]
    report.untouched = [RemainingSession(7, "client backend", "reporter", "bi", None, "idle", Untouched.EXCLUDED)]
    if not drained and not dry_run:
        report.survivors = [RemainingSession(43, "client backend", "app", "web", "10.0.0.7", "idle", signalled=True)]
    return report


def test_report_json_lists_survivors_and_untouched_apart_and_says_the_limits_are_ignored() -> None:
    doc = _report(drained=False).to_json()
    assert doc["enforcementAction"] == "enforce"
    assert doc["drained"] is False
    assert doc["timedOut"] is True
    assert doc["actions"][0]["pid"] == 42
    assert doc["survivors"] == [
        {
            "pid": 43,
            "user": "app",
            "database": "shop",
            "applicationName": "web",
            "clientAddress": "10.0.0.7",
            "state": "idle",
            "backendType": "client backend",
            "signalled": True,
        }
    ]
    assert doc["untouched"][0]["reason"] == "excluded"
    assert "signalled" not in doc["untouched"][0]
    assert doc["notes"] == [BLAST_RADIUS_NOTE]
    dry = _report(drained=False, dry_run=True).to_json()
    assert dry["enforcementAction"] == "dryRun"
    assert dry["timedOut"] is False


def test_text_report() -> None:
    text = render_text(_report(drained=True))
    assert text.startswith("drain shop  target db:5432  PostgreSQL 18.1  drained in 2 round(s)\n")
    assert f"note: {BLAST_RADIUS_NOTE}" in text
    assert "terminated (1):" in text
    assert "untouched (1):" in text
    assert "excluded" in text
    timed_out = render_text(_report(drained=False))
    assert "timed out after 60s with 1 session(s) left" in timed_out
    assert "survivors (1):" in timed_out
    assert "would terminate (1):" in render_text(_report(drained=False, dry_run=True))


def test_the_readme_kill_all_connections_example_is_valid_and_is_the_corpus_example() -> None:
    """The policy form of a drain, as the README shows it, parses, and says what tests/data/policies/valid/
    drain-database.yaml says (that file is admitted by the model and the API server: test_crd)."""
    readme = (REPO / "README.md").read_text()
    marker = '# "kill all connections to a database"'
    start = readme.index(marker)
    snippet = readme[start : readme.index("```", start)]
    spec = parse_spec(yaml.safe_load(snippet))
    corpus = {e.name: e for e in load_examples("valid")}["drain-database.yaml"].document()["spec"]
    corpus.pop("selector")
    assert spec == parse_spec(corpus)
    assert spec.limits.max_fraction_per_cycle == 1.0
    assert spec.sessions[0].databases == ["shop"]
