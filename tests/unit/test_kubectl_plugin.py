"""`kubectl pgwarden` without servers: status rows and table, explain's sources, the look-ahead's arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgwarden.cli import kubectl_explain, kubectl_status
from pgwarden.cli.kubectl_plugin import build_parser, main
from pgwarden.engine.explain import crossings, look_ahead_spec
from pgwarden.engine.report import ActionRecord, CycleReport, SkipRecord
from pgwarden.policy.api import SkipReason
from pgwarden.policy.model import EnforcementAction
from tests.harness.observations import observation, session, spec

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def policy(name: str = "p", *, status: dict[str, Any] | None = None, mode: str = "enforce") -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": name, "namespace": "ns"}, "spec": {"enforcementAction": mode}}
    if status is not None:
        body["status"] = status
    return body


READY_FALSE = {
    "type": "Ready",
    "status": "False",
    "reason": "CredentialsSecretNotFound",
    "message": "Secret pg-credentials not found",
}


# -- status --------------------------------------------------------------------------------------------------


def test_a_policy_without_targets_is_one_row_carrying_its_failing_condition() -> None:
    (row,) = kubectl_status.rows([policy(status={"conditions": [READY_FALSE]})])
    assert (row.ready, row.pod, row.error) == ("False (CredentialsSecretNotFound)", None, READY_FALSE["message"])
    (unseen,) = kubectl_status.rows([policy(mode="dryRun")])
    assert (unseen.mode, unseen.ready, unseen.error) == ("dry run", "Unknown", None)


def test_one_row_per_target_with_its_error_or_skip_reason() -> None:
    targets = [
        {"pod": "a", "enforcer": "controller", "error": "unreachable"},
        {"pod": "b", "enforcer": "controller", "skippedReason": "enforced by its sidecar"},
    ]
    ready = {**READY_FALSE, "status": "True"}
    rows = kubectl_status.rows([policy(status={"conditions": [ready], "targets": targets})])
    assert [(r.pod, r.ready, r.error) for r in rows] == [
        ("a", "True", "unreachable"),
        ("b", "True", "enforced by its sidecar"),
    ]


def test_actions_summary_counts_by_verb_and_rule_and_says_would_for_a_dry_run() -> None:
    actions = [
        {"rule": "idle", "action": "terminate", "done": True},
        {"rule": "idle", "action": "terminate", "done": True},
        {"rule": "idle", "action": "terminate", "done": False},
        {"rule": "slow", "action": "cancel", "done": True},
    ]
    assert kubectl_status.actions_summary(actions) == "cancel 1 (slow); terminate 2 (idle); would terminate 1 (idle)"
    assert kubectl_status.actions_summary([]) == "-"


@pytest.mark.parametrize(
    ("delta", "expected"),
    [(timedelta(seconds=5), "5s ago"), (timedelta(minutes=3, seconds=59), "3m ago"), (timedelta(days=2), "2d ago")],
)
def test_age_is_kubectl_style(delta: timedelta, expected: str) -> None:
    stamp = (NOW - delta).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert kubectl_status.age(stamp, NOW) == expected


def test_table_cuts_long_errors_to_one_line_and_json_keeps_them_whole() -> None:
    error = "line one\n" + "x" * 300
    (row,) = kubectl_status.rows([policy(status={"targets": [{"pod": "a", "error": error}]})])
    header, line = kubectl_status.render([row], NOW).splitlines()
    assert header.split()[:3] == ["NAMESPACE", "POLICY", "MODE"]
    assert line.endswith("…")
    assert "\n" not in line
    assert len(line.split("   ")[-1]) == kubectl_status.ERROR_COLUMN_CHARS
    assert row.to_json()["error"] == error


# -- explain -----------------------------------------------------------------------------------------------


def test_explain_from_status_lists_only_would_be_actions() -> None:
    target = {
        "pod": "db-0",
        "lastActionTime": "2026-05-01T11:59:00Z",
        "lastActions": [
            {"rule": "idle", "action": "terminate", "pid": 7, "user": "app", "state": "idle", "done": False},
            {"rule": "idle", "action": "terminate", "pid": 8, "done": True},
        ],
    }
    (row,) = kubectl_explain.from_status(policy(status={"targets": [target]}, mode="dryRun"))
    assert (row.target, row.record.pid, row.crosses_at, row.crosses_in) == ("db-0", 7, "2026-05-01T11:59:00Z", 0.0)
    line = kubectl_explain.render([row], kubectl_explain.SOURCE_STATUS, NOW).splitlines()[1]
    assert line.endswith("now as of 1m ago")


def test_a_status_written_for_an_older_spec_is_said_to_be_stale() -> None:
    body = policy(status={"observedGeneration": 2}, mode="dryRun")
    body["metadata"]["generation"] = 3
    assert (
        kubectl_explain.stale_status(body) == "the status was written for generation 2 of the spec, which is now at 3"
    )
    body["metadata"]["generation"] = 2
    assert kubectl_explain.stale_status(body) is None


def report(actions: list[ActionRecord], skipped: list[SkipRecord]) -> CycleReport:
    return CycleReport("p", "db:5432", "18.0", EnforcementAction.DRY_RUN, {}, {}, actions=actions, skipped=skipped)


def test_explain_from_cycle_now_held_back_then_the_next_crossings() -> None:
    acted, held, soon, later = session(age=30), session(age=20), session(age=8), session(age=5)
    the_spec = spec(sessions=[{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "10s"}])
    upcoming = crossings(observation(acted, held, soon, later), the_spec)
    record = ActionRecord("idle", "terminate", acted.pid, "app", "shop", "web", None, "idle", 30.0, False)
    cycle = report([record], [SkipRecord("idle", held.pid, SkipReason.MAX_ACTIONS)])
    rows = kubectl_explain.from_cycle(cycle, upcoming, NOW, next_count=1)
    assert [(r.record.pid, r.crosses_in, r.held_back) for r in rows] == [
        (acted.pid, 0.0, None),
        (held.pid, 0.0, SkipReason.MAX_ACTIONS),
        (soon.pid, pytest.approx(2.0), None),  # --next 1: the sooner of the two later ones
    ]
    assert rows[2].crosses_at == "2026-05-01T12:00:02Z"
    text = kubectl_explain.render(rows, kubectl_explain.SOURCE_DSN, NOW)
    assert "now, held back: maxActionsPerCycle" in text
    assert "in 2s (2026-05-01T12:00:02Z)" in text


# -- the look-ahead's arithmetic -------------------------------------------------------------------------------


def test_crossings_pick_the_soonest_rule_and_skip_what_no_rule_can_match() -> None:
    rules = [
        {"name": "long", "action": "terminate", "states": ["idle"], "stateAge": "1h"},
        {"name": "web", "action": "cancel", "states": ["idle"], "stateAge": "1m", "applicationNames": ["web"]},
    ]
    web, batch, active = session(age=50, app="web"), session(age=50, app="batch"), session("active", age=999)
    found = crossings(observation(web, batch, active), spec(sessions=rules))
    assert [(c.session.pid, c.rule, c.action, round(c.seconds, 6)) for c in found] == [
        (web.pid, "web", "cancel", 10.0),
        (batch.pid, "long", "terminate", 3550.0),
    ]


def test_crossings_leave_out_excluded_and_non_client_backends() -> None:
    rules = [{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "1m"}]
    excluded, walsender = session(user="admin"), session(backend_type="walsender")
    found = crossings(observation(excluded, walsender), spec(sessions=rules, exclude={"users": ["admin"]}))
    assert found == []


def test_look_ahead_spec_zeroes_every_age_and_drops_connection_limits() -> None:
    original = spec(
        sessions=[
            {"name": "a", "action": "terminate", "stateAge": "5m", "transactionAge": "1h"},
            {"name": "b", "action": "terminate", "blocking": {"minBlocked": 2, "minWait": "30s"}},
        ],
        connectionLimits=[{"name": "cap", "groupBy": "user", "max": 10}],
    )
    zeroed = look_ahead_spec(original)
    first, second = zeroed.sessions
    assert (first.state_age, first.transaction_age, first.query_age) == (timedelta(0), timedelta(0), None)
    assert second.blocking is not None
    assert (second.blocking.min_blocked, second.blocking.min_wait) == (2, timedelta(0))
    assert zeroed.connection_limits == []
    assert original.sessions[0].state_age == timedelta(minutes=5)  # the policy's own spec is left alone


# -- arguments -----------------------------------------------------------------------------------------------


def test_cluster_flags_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    before = parser.parse_args(["--context", "c", "--kubeconfig", "k", "status"])
    after = parser.parse_args(["status", "--context", "c", "--kubeconfig", "k"])
    assert (before.context, before.kubeconfig) == (after.context, after.kubeconfig) == ("c", "k")


def test_explain_help_names_both_sources(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["explain", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "status (default)" in text
    assert "--dsn DSN: the CLI engine" in text
