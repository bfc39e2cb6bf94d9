"""The tunables: read once from PGWARDEN_* variables and flags, checked, and one retry rule for every loop."""

from __future__ import annotations

import dataclasses

import pytest

from pgwarden.cli import build_parser, load_settings
from pgwarden.settings import DEFAULTS, Settings, SettingsError


def test_environment_overrides_defaults_and_flags_override_the_environment() -> None:
    env = {"PGWARDEN_CONCURRENCY": "64", "PGWARDEN_STATUS_HEARTBEAT": "120.5", "PGWARDEN_UNRELATED": "x"}
    settings = Settings.from_env(env)
    assert (settings.concurrency, settings.status_heartbeat) == (64, 120.5)
    assert settings.min_delay == DEFAULTS.min_delay
    assert settings.replace(concurrency=8, idle_poll=None).concurrency == 8  # None: the flag was not given
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.concurrency = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PGWARDEN_CONCURRENCY": "many"}, "PGWARDEN_CONCURRENCY: must be an integer, got 'many'"),
        ({"PGWARDEN_CONCURRENCY": "1.5"}, "PGWARDEN_CONCURRENCY: must be an integer"),
        ({"PGWARDEN_MIN_DELAY": "soon"}, "PGWARDEN_MIN_DELAY: must be a number"),
        ({"PGWARDEN_CONCURRENCY": "0"}, "PGWARDEN_CONCURRENCY: must be at least 1, got 0"),
        ({"PGWARDEN_RELEASE_TIMEOUT": "-1"}, "PGWARDEN_RELEASE_TIMEOUT: must be at least 0.1"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_one_retry_rule_doubles_from_min_delay_up_to_interval_and_max_backoff() -> None:
    assert [DEFAULTS.retry_delay(n, 30) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert DEFAULTS.retry_delay(50, 3600) == DEFAULTS.max_backoff
    assert DEFAULTS.retry_delay(1, 0.5) == DEFAULTS.min_delay  # never faster than min_delay
    slow = Settings(min_delay=2.0, max_backoff=10.0)
    assert [slow.retry_delay(n, 60) for n in range(1, 5)] == [2, 4, 8, 10]


def test_every_field_is_documented_with_its_variable() -> None:
    described = Settings.describe()
    assert len(described) == len(dataclasses.fields(Settings))
    assert all(var.startswith("PGWARDEN_") and doc for var, _default, doc in described)


def test_a_bad_variable_is_a_usage_error_of_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGWARDEN_SIDECAR_POLL", "0")
    assert load_settings("pgwarden sidecar") is None
    assert "pgwarden sidecar: PGWARDEN_SIDECAR_POLL: must be at least 0.1" in capsys.readouterr().err
    monkeypatch.delenv("PGWARDEN_SIDECAR_POLL")
    args = build_parser().parse_args(["run", "--concurrency", "7"])
    settings = load_settings("pgwarden run", concurrency=args.concurrency)
    assert settings is not None
    assert settings.concurrency == 7
