"""Invalid policies are refused with a message naming each offending field; valid ones parse as documented.

These are the messages `pgwarden enforce` prints before exiting 2 (tests/unit/test_cli.py checks the
wiring); here the model and `load_policy_document` are checked directly, field by field.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from pgwarden.policy import PolicyError, load_policy_document, parse_spec
from pgwarden.policy.model import EnforcementAction, GroupBy, SessionAction, SessionState


def _rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "action": "terminate", "stateAge": "1m", **fields}


INVALID_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("interval-too-short", {"interval": "500ms"}, "interval"),
    ("interval-not-duration", {"interval": "10 minutes"}, "spec.interval"),
    ("interval-negative", {"interval": "-5s"}, "spec.interval"),
    ("interval-number", {"interval": 30}, "spec.interval"),
    ("enforcement-action", {"enforcementAction": "audit"}, "spec.enforcementAction"),
    ("max-actions-zero", {"limits": {"maxActionsPerCycle": 0}}, "spec.limits.maxActionsPerCycle"),
    ("max-actions-fraction", {"limits": {"maxActionsPerCycle": 1.5}}, "spec.limits.maxActionsPerCycle"),
    ("max-fraction-zero", {"limits": {"maxFractionPerCycle": 0}}, "spec.limits.maxFractionPerCycle"),
    ("max-fraction-above-one", {"limits": {"maxFractionPerCycle": 1.5}}, "spec.limits.maxFractionPerCycle"),
    ("limits-unknown", {"limits": {"maxActions": 5}}, "spec.limits.maxActions"),
    ("exclude-empty-pattern", {"exclude": {"users": [""]}}, "spec.exclude.users[0]"),
    ("exclude-unknown", {"exclude": {"clientAddresses": ["10.0.0.0/8"]}}, "spec.exclude.clientAddresses"),
    ("sessions-not-list", {"sessions": "idle"}, "spec.sessions"),
    ("rule-without-age", {"sessions": [{"name": "r", "action": "terminate"}]}, "spec.sessions[0]"),
    ("rule-without-name", {"sessions": [{"action": "terminate", "stateAge": "1m"}]}, "spec.sessions[0].name"),
    ("rule-bad-name", {"sessions": [_rule(name="Idle_Rule")]}, "spec.sessions[0].name"),
    ("rule-long-name", {"sessions": [_rule(name="a" * 64)]}, "spec.sessions[0].name"),
    ("rule-bad-action", {"sessions": [_rule(action="kill")]}, "spec.sessions[0].action"),
    ("rule-no-action", {"sessions": [{"name": "r", "stateAge": "1m"}]}, "spec.sessions[0].action"),
    ("rule-bad-state", {"sessions": [_rule(states=["sleeping"])]}, "spec.sessions[0].states[0]"),
    ("rule-bad-state-age", {"sessions": [_rule(stateAge="ten minutes")]}, "spec.sessions[0].stateAge"),
    ("rule-bad-query-age", {"sessions": [_rule(queryAge="5")]}, "spec.sessions[0].queryAge"),
    ("rule-bad-transaction-age", {"sessions": [_rule(transactionAge="1d")]}, "spec.sessions[0].transactionAge"),
    ("rule-bad-connection-age", {"sessions": [_rule(connectionAge="-1h")]}, "spec.sessions[0].connectionAge"),
    ("rule-bad-cidr", {"sessions": [_rule(clientAddresses=["10.0.0.0/33"])]}, "spec.sessions[0].clientAddresses[0]"),
    ("rule-hostname", {"sessions": [_rule(clientAddresses=["db.example"])]}, "spec.sessions[0].clientAddresses[0]"),
    ("rule-users-not-list", {"sessions": [_rule(users="app")]}, "spec.sessions[0].users"),
    ("rule-null-pattern", {"sessions": [_rule(applicationNames=[None])]}, "spec.sessions[0].applicationNames[0]"),
    ("rule-typo", {"sessions": [_rule(user=["app"])]}, "spec.sessions[0].user"),
    ("rule-second-bad", {"sessions": [_rule(), _rule(name="s", action="stop")]}, "spec.sessions[1].action"),
    ("rule-duplicate-names", {"sessions": [_rule(), _rule(action="cancel")]}, "names must be unique"),
    (
        "limit-bad-group",
        {"connectionLimits": [{"name": "c", "groupBy": "host", "max": 1}]},
        "spec.connectionLimits[0].groupBy",
    ),
    (
        "limit-negative",
        {"connectionLimits": [{"name": "c", "groupBy": "user", "max": -1}]},
        "spec.connectionLimits[0].max",
    ),
    ("limit-no-max", {"connectionLimits": [{"name": "c", "groupBy": "user"}]}, "spec.connectionLimits[0].max"),
    (
        "limit-states",
        {"connectionLimits": [{"name": "c", "groupBy": "user", "max": 1, "states": ["idle"]}]},
        "spec.connectionLimits[0].states",
    ),
    (
        "limit-duplicate-names",
        {
            "connectionLimits": [
                {"name": "c", "groupBy": "user", "max": 1},
                {"name": "c", "groupBy": "database", "max": 1},
            ]
        },
        "names must be unique",
    ),
    ("autovacuum-zero", {"autovacuum": {"maxWorkers": 0}}, "spec.autovacuum.maxWorkers"),
    ("autovacuum-unknown", {"autovacuum": {"workers": 2}}, "spec.autovacuum.workers"),
    (
        "selector-in-without-values",
        {"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        "spec.selector.matchExpressions[0]",
    ),
    ("connection-port", {"connection": {"port": 70000}}, "spec.connection.port"),
    ("connection-ssl", {"connection": {"sslMode": "maybe"}}, "spec.connection.sslMode"),
    ("unknown-top-level", {"sessionRules": []}, "spec.sessionRules"),
]


@pytest.mark.parametrize(("spec", "field"), [(s, f) for _, s, f in INVALID_SPECS], ids=[i for i, _, _ in INVALID_SPECS])
def test_invalid_spec_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_spec(spec)
    assert field in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_spec({"interval": "x", "sessions": [_rule(action="kill", states=["nap"])]})
    lines = str(caught.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "spec.interval",
        "spec.sessions[0].action",
        "spec.sessions[0].states[0]",
    ]


def test_spec_must_be_a_mapping() -> None:
    with pytest.raises(PolicyError, match="spec: must be a mapping"):
        parse_spec(["sessions"])


DOC = """
apiVersion: pgwarden.dev/v1alpha1
kind: PostgresPolicy
metadata: {name: shop-idle}
spec:
  sessions:
    - {name: idle, action: terminate, states: [idle], stateAge: 10m}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must hold one PostgresPolicy"),
        ("- a\n- b\n", "must hold one PostgresPolicy"),
        ("a: [", "not valid YAML"),
        (DOC.replace("pgwarden.dev/v1alpha1", "v1"), "apiVersion"),
        (DOC.replace("kind: PostgresPolicy", "kind: Policy"), "kind"),
        (DOC.replace("metadata: {name: shop-idle}", "metadata: {}"), "metadata.name"),
        (DOC.replace("metadata: {name: shop-idle}\n", ""), "metadata"),
        (DOC + "status: {}\nextra: 1\n", "extra: unknown field"),
        (DOC.replace("stateAge: 10m", "stateAge: 10 m"), "spec.sessions[0].stateAge"),
        ("apiVersion: pgwarden.dev/v1alpha1\nkind: PostgresPolicy\nmetadata: {name: x}\n", "spec"),
    ],
    ids=["empty", "list", "yaml", "api-version", "kind", "no-name", "no-metadata", "unknown", "duration", "no-spec"],
)
def test_invalid_documents(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_policy_document(text)


def test_the_issue_example_parses_with_its_defaults() -> None:
    doc = load_policy_document(
        """
apiVersion: pgwarden.dev/v1alpha1
kind: PostgresPolicy
metadata: {name: example, namespace: db}
spec:
  selector: {matchLabels: {app: postgres}}
  connection:
    port: 5432
    database: postgres
    sslMode: prefer
    credentialsSecret: {name: pgwarden-credentials, usernameKey: username, passwordKey: password}
  interval: 30s
  enforcementAction: enforce
  limits: {maxActionsPerCycle: 50, maxFractionPerCycle: 0.5}
  exclude:
    users: [postgres]
    databases: []
    applicationNames: ["pgwarden*"]
  sessions:
    - name: idle-connections
      action: terminate
      states: [idle]
      stateAge: 10m
      users: []
      databases: []
      applicationNames: []
      clientAddresses: []
  connectionLimits:
    - name: per-user
      groupBy: user
      max: 20
      users: []
      includeActive: false
  autovacuum: {}
"""
    )
    spec = doc.spec
    assert doc.metadata.name == "example"
    assert spec.interval == timedelta(seconds=30)
    assert spec.enforcement_action is EnforcementAction.ENFORCE
    assert not spec.dry_run
    rule = spec.sessions[0]
    assert rule.action is SessionAction.TERMINATE
    assert rule.states == [SessionState.IDLE]
    assert rule.ages() == {
        "state_change": timedelta(minutes=10),
        "query_start": None,
        "xact_start": None,
        "backend_start": None,
    }
    assert spec.connection_limits[0].group_by is GroupBy.USER
    assert spec.connection_limits[0].max == 20
    assert spec.autovacuum.max_workers is None


def test_defaults_and_the_seed_policies() -> None:
    spec = parse_spec({"sessions": [{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "5m"}]})
    assert spec.limits.max_actions_per_cycle == 50
    assert spec.limits.max_fraction_per_cycle == 0.5
    assert spec.interval == timedelta(seconds=30)
    drain = parse_spec(
        {
            "limits": {"maxActionsPerCycle": 100000, "maxFractionPerCycle": 1.0},
            "sessions": [{"name": "drain", "action": "terminate", "databases": ["shop"], "connectionAge": "0s"}],
        }
    )
    assert drain.sessions[0].connection_age == timedelta(0)
    assert drain.sessions[0].ages()["backend_start"] == timedelta(0)
