"""An impostor at a pod's address asks for a weak password method: it never receives the password.

Anyone who can run a pod with the selected labels (or inherit a released pod IP) can listen at
podIP:port. Without `require_auth`, libpq answers a request for a cleartext password with the password.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg import conninfo

from pgwarden.cli import EXIT_UNREACHABLE
from pgwarden.engine.connection import parse_dsn
from pgwarden.engine.errors import InvalidDsn, TargetUnreachable
from pgwarden.engine.session import EngineTarget
from tests.fixtures.postgres import PgFactory
from tests.harness.cli import policy_file
from tests.harness.engine import spec_of
from tests.harness.faults import AUTH_CLEARTEXT, AUTH_MD5, Impostor, Stopwatch, report_figures
from tests.harness.postgres import free_port

_octets = itertools.count(10)
PASSWORD = "Impostor-Bait-Pa55"
OPERATOR = Path(__file__).resolve().parents[2] / "operator"
REFUSED = {AUTH_CLEARTEXT: "server requested a cleartext password", AUTH_MD5: "server requested a hashed password"}


def next_host() -> str:
    return f"127.0.{next(_octets)}.46"


def require_auth_of(dsn: str, **kwargs: str) -> str | None:
    value = conninfo.conninfo_to_dict(parse_dsn(dsn, **kwargs).conninfo).get("require_auth")  # type: ignore[arg-type]
    return None if value is None else str(value)


def test_require_auth_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PGREQUIREAUTH", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    # The controller decides: its value, mapped to "this method or a stronger one".
    assert require_auth_of("host=a", require_auth="scram-sha-256") == "scram-sha-256"
    assert require_auth_of("host=a", require_auth="md5") == "scram-sha-256,md5"
    assert require_auth_of("host=a", require_auth="password") == "scram-sha-256,md5,password"
    assert require_auth_of("host=a require_auth=password", require_auth="any") is None
    with pytest.raises(InvalidDsn, match="requireAuth must be one of"):
        parse_dsn("host=a", require_auth="trust")
    # The CLI: the DSN's own choice wins; otherwise SCRAM whenever there is a password to give away.
    assert require_auth_of("host=a password=x") == "scram-sha-256"
    assert require_auth_of("host=a password=x require_auth=md5") == "md5"
    assert require_auth_of("host=a") is None
    monkeypatch.setenv("PGPASSWORD", "x")
    assert require_auth_of("host=a") == "scram-sha-256"
    monkeypatch.setenv("PGREQUIREAUTH", "password")
    assert require_auth_of("host=a") is None  # libpq applies PGREQUIREAUTH itself
    monkeypatch.delenv("PGREQUIREAUTH")
    monkeypatch.delenv("PGPASSWORD")
    (tmp_path / "pgpass").write_text("*:*:*:*:x\n")
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "pgpass"))
    assert require_auth_of("host=a") == "scram-sha-256"


@pytest.mark.parametrize("auth_code", [AUTH_CLEARTEXT, AUTH_MD5], ids=["cleartext", "md5"])
async def test_impostor_asking_for_a_weak_method_never_receives_the_password(auth_code: int) -> None:
    host = next_host()
    with Impostor(host, free_port(host), auth_code=auth_code) as impostor:
        target = EngineTarget(
            host=host, port=impostor.port, dbname="postgres", user="warden", password=PASSWORD, sslmode="prefer"
        )
        clock = Stopwatch()
        with pytest.raises(TargetUnreachable) as caught:
            await target.evaluate(spec_of(), policy="ns/p", target=f"{host}:{impostor.port}")
        detected = clock()
        await target.close()
        assert impostor.startups >= 1  # it was asked, and it asked for the weak method
        message = str(caught.value)
        assert 'requirement "scram-sha-256" failed' in message
        assert REFUSED[auth_code] in message
        report_figures(
            f"impostor asking for {'a cleartext' if auth_code == AUTH_CLEARTEXT else 'an md5'} password",
            "fake server at the pod address (EngineTarget, default requireAuth)",
            detect_s=detected,
            secrets_exposed=len(impostor.passwords),
        )
        assert impostor.passwords == []


async def test_a_user_who_chooses_password_auth_gets_what_they_chose() -> None:
    host = next_host()
    with Impostor(host, free_port(host), auth_code=AUTH_CLEARTEXT) as impostor:
        target = EngineTarget(
            host=host,
            port=impostor.port,
            dbname="postgres",
            user="warden",
            password=PASSWORD,
            sslmode="disable",
            require_auth="password",
        )
        with pytest.raises(TargetUnreachable):
            await target.evaluate(spec_of(), policy="ns/p", target=f"{host}:{impostor.port}")
        await target.close()
        assert impostor.passwords == [PASSWORD.encode() + b"\0"]  # the knob is real, and so is the risk


def test_cli_with_a_password_refuses_the_impostor(tmp_path: Path) -> None:
    host = next_host()
    with Impostor(host, free_port(host), auth_code=AUTH_CLEARTEXT) as impostor:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "pgwarden", "enforce", "--once", "--policy", str(policy_file(tmp_path, "x"))),
                *("--dsn", f"host={host} port={impostor.port} user=warden password={PASSWORD} dbname=postgres"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": str(OPERATOR)},
        )
        assert result.returncode == EXIT_UNREACHABLE, result.stderr
        assert "server requested a cleartext password" in result.stderr
        assert PASSWORD not in result.stderr + result.stdout
        assert impostor.startups >= 1
        assert impostor.passwords == []


@pytest.mark.pg
async def test_real_server_with_scram_is_reached_with_the_default(pg_factory: PgFactory) -> None:
    server = pg_factory(host=next_host(), hba="password")  # scram-sha-256 in pg_hba.conf, password_encryption
    server.create_role("warden", password=PASSWORD, grants=("pg_read_all_stats",))
    target = EngineTarget(
        host=server.host, port=server.port, dbname="postgres", user="warden", password=PASSWORD, sslmode="prefer"
    )
    try:
        report, _ = await target.evaluate(spec_of(), policy="ns/p", target=f"{server.host}:{server.port}")
    finally:
        await target.close()
    assert report.server_version.split(".")[0] == server.major
