"""`pgwarden enforce` end to end: the installed console script as a subprocess against real servers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pgwarden.policy.api import SkipReason
from tests.fixtures.postgres import PgFactory
from tests.harness.cli import CODE_UNDER_TEST, PGWARDEN, policy_file
from tests.harness.engine import unique, wait_all_gone
from tests.harness.postgres import PgServer, free_port

pytestmark = pytest.mark.pg

CONTRACT_KEYS = [
    "policy",
    "target",
    "serverVersion",
    "enforcementAction",
    "backends",
    "clientStates",
    "actions",
    "skipped",
    "errors",
]
ACTION_KEYS = [
    "rule",
    "action",
    "pid",
    "user",
    "database",
    "applicationName",
    "clientAddress",
    "state",
    "stateAgeSeconds",
    "done",
]


def run(*args: str, timeout: float = 30, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGWARDEN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        check=False,
        env=CODE_UNDER_TEST,
    )


def log_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_once_prints_the_json_contract_and_acts(pg: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    victims = [pg.open_session("idle", application_name=app) for _ in range(3)]
    busy = pg.open_session("active", application_name=app)
    result = run("enforce", "--dsn", pg.dsn(), "--policy", str(policy_file(tmp_path, app)), "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert list(report) == CONTRACT_KEYS
    assert report["policy"] == "demo"
    assert report["target"] == f"{pg.host}:{pg.port}"
    assert report["serverVersion"].split(".")[0] == pg.major
    assert report["enforcementAction"] == "enforce"
    assert report["backends"]["client backend"] >= 5
    assert report["backends"]["checkpointer"] == 1
    assert report["clientStates"]["idle"] >= 3
    assert report["clientStates"]["active"] >= 2
    assert len(report["actions"]) == 2
    assert len(report["skipped"]) == 1
    assert report["skipped"][0]["reason"] == SkipReason.MAX_ACTIONS
    action = report["actions"][0]
    assert list(action) == ACTION_KEYS
    assert action["rule"] == "idle-connections"
    assert action["action"] == "terminate"
    assert action["done"] is True
    assert action["user"] == "postgres"
    assert action["database"] == "postgres"
    assert action["applicationName"] == app
    assert action["clientAddress"] == "127.0.0.1"
    assert action["state"] == "idle"
    assert isinstance(action["stateAgeSeconds"], float)
    assert report["errors"] == []
    done = {a["pid"] for a in report["actions"]}
    wait_all_gone(pg, done)
    assert pg.alive(busy.pid)
    assert {v.pid for v in victims if pg.alive(v.pid)} == {report["skipped"][0]["pid"]}
    # Logs: JSON on stderr (not a terminal), one line per action with the fields an auditor needs.
    logs = log_lines(result.stderr)
    signalled = [entry for entry in logs if entry.get("event") == "session terminated"]
    assert {entry["pid"] for entry in signalled} == done
    for entry in signalled:
        assert {"policy", "target", "rule", "pid", "user", "database", "application", "action", "dry_run"} <= set(entry)
        assert entry["policy"] == "demo"
        assert entry["dry_run"] is False


def test_dry_run_flag_acts_on_nothing(pg: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    victim = pg.open_session("idle", application_name=app)
    result = run("enforce", "--dsn", pg.dsn(), "--policy", str(policy_file(tmp_path, app)), "--once", "--dry-run")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["enforcementAction"] == "dryRun"
    assert [(a["pid"], a["done"]) for a in report["actions"]] == [(victim.pid, False)]
    assert pg.alive(victim.pid)
    assert any(entry.get("event") == "would terminate session" for entry in log_lines(result.stderr))


def test_text_output_and_policy_from_stdin(pg: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    app = unique(request)
    victim = pg.open_session("idle", application_name=app)
    text = policy_file(tmp_path, app).read_text()
    result = run("enforce", "--dsn", pg.dsn(), "--policy", "-", "--once", "--dry-run", "--output", "text", stdin=text)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"policy demo  target {pg.host}:{pg.port}  PostgreSQL {pg.major}.")
    assert "RULE" in result.stdout
    assert "STATE AGE" in result.stdout
    assert str(victim.pid) in result.stdout
    assert "idle-connections" in result.stdout


def test_unreachable_server_exits_3_within_the_connect_timeout(tmp_path: Path) -> None:
    port = free_port()
    dsn = f"host=127.0.0.1 port={port} user=postgres password=hunter2-secret dbname=postgres"
    started = time.monotonic()
    result = run("enforce", "--dsn", dsn, "--policy", str(policy_file(tmp_path, "x")), "--once")
    assert result.returncode == 3
    assert time.monotonic() - started < 5 + 3  # connect_timeout, plus interpreter start-up
    assert result.stdout == ""
    assert f"127.0.0.1:{port}" in result.stderr
    assert "hunter2-secret" not in result.stderr


def test_failed_authentication_exits_3_without_leaking_the_password(pg_factory: PgFactory, tmp_path: Path) -> None:
    server = pg_factory(host="127.0.0.5", hba="password")
    server.create_role("guard", password="right-password-1", grants=("pg_read_all_stats", "pg_signal_backend"))
    wrong = server.dsn(user="guard", password="wrong-password-42")
    result = run("enforce", "--dsn", wrong, "--policy", str(policy_file(tmp_path, "x")), "--once")
    assert result.returncode == 3
    assert "authentication failed for the user in the connection string" in result.stderr
    assert "wrong-password-42" not in result.stderr
    assert "wrong-password-42" not in result.stdout
    uri = f"postgresql://guard:right-password-1@{server.host}:{server.port}/postgres"
    result = run("enforce", "--dsn", uri, "--policy", str(policy_file(tmp_path, "x")), "--once")
    assert result.returncode == 0, result.stderr
    assert "right-password-1" not in result.stderr + result.stdout


def test_invalid_policy_exits_2_naming_the_field_and_touches_nothing(
    pg: PgServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    app = unique(request)
    victim = pg.open_session("idle", application_name=app)
    bad = policy_file(
        tmp_path,
        app,
        extra="    - {name: Bad_Name, action: terminate, stateAge: 10 minutes}\n",
    )
    result = run("enforce", "--dsn", pg.dsn(), "--policy", str(bad), "--once")
    assert result.returncode == 2
    assert "spec.sessions[1].name" in result.stderr
    assert "spec.sessions[1].stateAge" in result.stderr
    assert result.stdout == ""
    assert pg.alive(victim.pid)
    assert not pg.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgwarden'")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_loop_runs_until_signalled_then_exits_0(
    pg: PgServer, tmp_path: Path, request: pytest.FixtureRequest, sig: signal.Signals
) -> None:
    app = unique(request)
    victim = pg.open_session("idle", application_name=app)
    proc = subprocess.Popen(
        [PGWARDEN, "enforce", "--dsn", pg.dsn(), "--policy", str(policy_file(tmp_path, app))],
        env=CODE_UNDER_TEST,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # one line per cycle, flushed as it happens
        assert [a["pid"] for a in first["actions"]] == [victim.pid]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    for line in out.splitlines():
        assert list(json.loads(line)) == CONTRACT_KEYS
    assert any(entry.get("event") == "stopped" for entry in log_lines(err))
