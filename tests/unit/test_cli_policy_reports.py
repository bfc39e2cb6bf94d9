"""`pgwarden run --no-policy-reports` and PGWARDEN_POLICY_REPORTS reach the controller's settings."""

from __future__ import annotations

from typing import Any

import pytest

from pgwarden.cli import build_parser
from pgwarden.settings import Settings


def run_settings(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Settings:
    """The settings `pgwarden run ARGV` would start the controller with (run_controller replaced)."""
    seen: dict[str, Any] = {}

    def fake_run_controller(**kwargs: Any) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr("pgwarden.controller.app.run_controller", fake_run_controller)
    args = build_parser().parse_args(["run", "--standalone", *argv])
    assert args.handler(args) == 0
    settings = seen["settings"]
    assert isinstance(settings, Settings)
    return settings


def test_reports_are_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGWARDEN_POLICY_REPORTS", raising=False)
    assert run_settings(monkeypatch, []).policy_reports == 1


def test_the_flag_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGWARDEN_POLICY_REPORTS", raising=False)
    assert run_settings(monkeypatch, ["--no-policy-reports"]).policy_reports == 0


def test_the_variable_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGWARDEN_POLICY_REPORTS", "0")
    assert run_settings(monkeypatch, []).policy_reports == 0
