"""The engine's connection settings and secret hygiene, without a server."""

from __future__ import annotations

import socket

import pytest
from psycopg import conninfo

from pgwarden.engine.connection import connect, format_target, parse_dsn, redact
from pgwarden.engine.errors import InvalidDsn, TargetUnreachable


def test_engine_settings_are_added_and_the_users_options_kept() -> None:
    dsn = parse_dsn("host=db.example port=6432 user=guard password=s3cret options='-c work_mem=8MB'")
    params = conninfo.conninfo_to_dict(dsn.conninfo)
    assert params["application_name"] == "pgwarden"
    assert params["connect_timeout"] == "5"
    assert str(params["options"]).startswith("-c statement_timeout=5000 -c lock_timeout=2000")
    assert str(params["options"]).endswith("-c work_mem=8MB")  # later wins: a user's explicit choice stands
    assert dsn.target == "db.example:6432"
    assert dsn.password == "s3cret"
    assert "s3cret" not in repr(dsn.target)


def test_uri_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGHOST", "PGPORT", "PGCONNECT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    dsn = parse_dsn("postgresql://guard:pw@[fd00::5]:5433/shop?connect_timeout=9&application_name=mine")
    params = conninfo.conninfo_to_dict(dsn.conninfo)
    assert params["connect_timeout"] == "9"
    assert params["application_name"] == "pgwarden"  # the engine always names itself
    assert dsn.target == "[fd00::5]:5433"
    assert parse_dsn("dbname=x").target == "localhost:5432"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    assert "connect_timeout" not in conninfo.conninfo_to_dict(parse_dsn("host=a").conninfo)


def test_format_target() -> None:
    assert format_target("/var/run/postgresql", 5432) == "/var/run/postgresql:5432"
    assert format_target("a,b", "1,2") == "a:1"
    assert format_target("::1", 5432) == "[::1]:5432"


@pytest.mark.parametrize(
    "bad",
    ["host=x password=sec ret", "password='unterminated", "postgresql://u:pw@h:notaport/db?x=1&&&=", "=value"],
)
def test_invalid_dsn_never_echoes_it(bad: str) -> None:
    try:
        parse_dsn(bad)
    except InvalidDsn as exc:
        message = str(exc)
        assert "sec" not in message
        assert "pw" not in message
        assert "unterminated" not in message
        assert "--dsn" in message
    else:
        pytest.skip(f"libpq accepts {bad!r}")


def test_redact() -> None:
    assert redact("failed for password=hunter22 host=x") == "failed for password=*** host=x"
    assert redact("postgresql://u:hunter22@h/db") == "postgresql://u:***@h/db"
    assert redact("echo hunter22 back", "hunter22") == "echo *** back"
    assert redact("a b c", "a") == "a b c"  # too short to mask without garbling every message


async def test_unreachable_server_is_a_typed_error_without_the_password() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TargetUnreachable) as caught:
        await connect(f"host=127.0.0.1 port={port} user=u password=topsecret-9 dbname=d connect_timeout=2")
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "topsecret-9" not in str(caught.value)


@pytest.mark.parametrize(
    ("dsn", "required"),
    [
        ("host=db.internal password=x", "scram-sha-256"),  # a password over TCP: SCRAM at least
        ("host=127.0.0.1 password=x", "scram-sha-256"),
        ("host=/var/run/postgresql password=x", None),  # a socket: nobody can stand in; trust/peer send none
        ("password=x", None),  # no host: the default socket directory
        ("host=/var/run/postgresql,db.internal password=x", "scram-sha-256"),  # any TCP host among them
        ("host=db.internal", None),  # no password to give away
        ("host=db.internal password=x require_auth=md5", "md5"),  # the user's own choice stands
    ],
)
def test_scram_is_required_when_a_password_could_go_over_the_network(
    dsn: str, required: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PGHOST", "PGPASSWORD", "PGREQUIREAUTH", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    assert conninfo.conninfo_to_dict(parse_dsn(dsn).conninfo).get("require_auth") == required


def test_a_socket_from_pghost_counts_as_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar's usual setup: PGHOST=/var/run/postgresql and PGPASSWORD from a Secret."""
    monkeypatch.setenv("PGHOST", "/var/run/postgresql")
    monkeypatch.setenv("PGPASSWORD", "x")
    monkeypatch.delenv("PGREQUIREAUTH", raising=False)
    assert "require_auth" not in conninfo.conninfo_to_dict(parse_dsn("").conninfo)
