"""`pgwarden` argument handling that needs no server: version, usage errors and invalid policies (exit 2).

Every exit-2 path is checked before any connection is attempted, so these run against a DSN that
points nowhere: reaching it would be a bug (and would exit 3, not 2).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pgwarden import __version__
from pgwarden.cli import EXIT_UNREACHABLE, EXIT_USAGE, build_parser, main


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures logging for the process; undo it so later tests do not log into a closed capture."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "pgwarden"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()


@pytest.fixture
def nowhere() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"host=127.0.0.1 port={port} user=postgres password=pa55-word-x connect_timeout=2"


def _policy(tmp_path: Path, spec: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(f"apiVersion: pgwarden.dev/v1alpha1\nkind: PostgresPolicy\nmetadata: {{name: p}}\nspec:\n{spec}")
    return str(path)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"pgwarden {__version__}"


def test_subcommands_are_registered() -> None:
    parser = build_parser()
    help_text = parser.format_help()
    assert "enforce" in help_text


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["enforce"],
        ["enforce", "--policy", "p.yaml"],
        ["enforce", "--dsn", "x"],
        ["enforce", "--dsn", "x", "--policy", "p.yaml", "--output", "yaml"],
        ["enforce", "--dsn", "x", "--policy", "p.yaml", "--bogus"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    assert capsys.readouterr().err


INVALID = [
    ("  interval: 10 minutes\n", "spec.interval"),
    ("  limits: {maxFractionPerCycle: 2}\n", "spec.limits.maxFractionPerCycle"),
    ("  sessions:\n    - {name: idle, action: terminate}\n", "spec.sessions[0]"),
    ("  sessions:\n    - {name: idle, action: nuke, stateAge: 1m}\n", "spec.sessions[0].action"),
    (
        "  sessions:\n    - {name: idle, action: terminate, stateAge: 1m, states: [napping]}\n",
        "spec.sessions[0].states[0]",
    ),
    (
        "  sessions:\n    - {name: idle, action: terminate, stateAge: 1m, clientAddresses: [nope]}\n",
        "clientAddresses[0]",
    ),
    ("  connectionLimits:\n    - {name: c, groupBy: pod, max: 1}\n", "spec.connectionLimits[0].groupBy"),
    ("  exclude: {user: [postgres]}\n", "spec.exclude.user"),
    ("  typo: 1\n", "spec.typo"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_policy_exits_2_naming_the_field(
    tmp_path: Path, nowhere: str, capsys: pytest.CaptureFixture[str], spec: str, field: str
) -> None:
    code = main(["enforce", "--dsn", nowhere, "--policy", _policy(tmp_path, spec), "--once"])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert field in captured.err
    assert "invalid policy" in captured.err
    assert captured.out == ""


def test_unreadable_policy_file_exits_2(tmp_path: Path, nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enforce", "--dsn", nowhere, "--policy", str(tmp_path / "missing.yaml"), "--once"]) == EXIT_USAGE
    assert "--policy: cannot read" in capsys.readouterr().err
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(["enforce", "--dsn", nowhere, "--policy", str(binary), "--once"]) == EXIT_USAGE


def test_not_a_policy_document_exits_2(tmp_path: Path, nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert main(["enforce", "--dsn", nowhere, "--policy", str(path), "--once"]) == EXIT_USAGE
    assert "apiVersion" in capsys.readouterr().err


def test_invalid_dsn_exits_2_without_echoing_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = _policy(tmp_path, "  sessions: []\n")
    assert main(["enforce", "--dsn", "host=x password=top secret", "--policy", policy, "--once"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--dsn" in err
    assert "secret" not in err


def test_valid_policy_but_no_server_exits_3(tmp_path: Path, nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    policy = _policy(tmp_path, "  sessions: []\n")
    assert main(["enforce", "--dsn", nowhere, "--policy", policy, "--once", "--output", "json"]) == EXIT_UNREACHABLE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot connect" in captured.err
    assert "pa55-word-x" not in captured.err
