"""The PrometheusRule's alerts, checked and unit-tested by the real promtool.

The rules file promtool reads is the PrometheusRule's `spec`, extracted here: one source, no copy to
keep in step. `promtool test rules` runs tests/data/monitoring/alerts_test.yaml, where every alert has a
case in which it fires and cases in which it must stay silent.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.prometheus import promtool

pytestmark = [pytest.mark.prometheus]

REPO = Path(__file__).resolve().parents[2]
RULE = REPO / "manifests" / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = REPO / "tests" / "data" / "monitoring" / "alerts_test.yaml"
ALERTS = {
    "PgwardenTargetFailing",
    "PgwardenPolicyNotReady",
    "PgwardenEnforcementStalled",
    "PgwardenActionsSpiking",
    "PgwardenSessionsNotPermitted",
    "PgwardenInsufficientPrivileges",
}


def rule_groups() -> dict[str, Any]:
    """The PrometheusRule's spec: exactly a Prometheus rules file (`groups:`)."""
    body = yaml.safe_load(RULE.read_text())
    assert (body["apiVersion"], body["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    return dict(body["spec"])


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups()["groups"] for rule in group["rules"] if "alert" in rule]


def write_rules(directory: Path) -> Path:
    path = directory / "pgwarden-rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    return path


def test_the_rule_has_the_alerts_the_readme_lists() -> None:
    assert {rule["alert"] for rule in alert_rules()} == ALERTS


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    done = promtool("check", "rules", str(write_rules(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_every_alert_has_a_promtool_unit_test() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested == ALERTS
    # ... one where it fires and one where it does not (the other series of each test stay silent too).
    for alert in ALERTS:
        cases = [case for test in tests for case in test["alert_rule_test"] if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in cases), alert
        assert any(not case["exp_alerts"] for case in cases), alert


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    write_rules(tmp_path)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    done = promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are not vacuous: with a threshold moved they fail (here: 'for' of TargetFailing)."""
    groups = rule_groups()
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "PgwardenTargetFailing":
                rule["for"] = "1m"
    (tmp_path / "pgwarden-rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    done = promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0
    assert "PgwardenTargetFailing" in done.stdout + done.stderr
