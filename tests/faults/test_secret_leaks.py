"""Secret values never leak: a failed login is reported as a category, never with the server's text.

A policy author chooses which keys of a Secret are the user name and the password; pointing
`usernameKey` at the password key (or at any other key) must not turn status, Events, logs or metrics
into a way to read the Secret.
"""

from __future__ import annotations

import base64
import itertools
from types import SimpleNamespace

import pytest

from pgwarden.enforcement.kube import Credentials, CredentialsError, _credentials_data
from pgwarden.engine.connection import connect_failure, parse_dsn
from pgwarden.engine.errors import TargetUnreachable
from pgwarden.engine.session import EngineTarget
from pgwarden.policy.api import CREDENTIALS_LABEL, ConditionReason
from tests.fixtures.postgres import PgFactory
from tests.harness.engine import spec_of
from tests.harness.faults import Stopwatch, report_figures

_octets = itertools.count(10)
PASSWORD = "Leak-Test-Pa55w0rd-91c4"
CANARY = "canary-5e0b7d3a"


def next_host() -> str:
    return f"127.0.{next(_octets)}.42"


def secret(labels: dict[str, str] | None, **values: bytes) -> SimpleNamespace:
    """What the kubernetes client returns for a Secret: base64 values, labels in metadata."""
    data = {k: base64.b64encode(v).decode() for k, v in values.items()}
    return SimpleNamespace(metadata=SimpleNamespace(labels=labels), data=data)


def test_credentials_repr_hides_both_values() -> None:
    text = repr(Credentials(CANARY, PASSWORD))
    assert CANARY not in text
    assert PASSWORD not in text


@pytest.mark.parametrize("labels", [None, {}, {CREDENTIALS_LABEL: "false"}, {"app": "pg"}])
def test_only_labelled_secrets_are_read(labels: dict[str, str] | None) -> None:
    with pytest.raises(CredentialsError) as caught:
        _credentials_data("ns", "plain", secret(labels, username=b"warden", password=PASSWORD.encode()))
    assert caught.value.reason == ConditionReason.CREDENTIALS_SECRET_NOT_LABELLED
    assert PASSWORD not in str(caught.value)
    assert CREDENTIALS_LABEL in str(caught.value)


def test_labelled_secret_is_read() -> None:
    data = _credentials_data("ns", "ok", secret({CREDENTIALS_LABEL: "true"}, username=b"warden", password=b"pw"))
    assert data == {"username": "warden", "password": "pw"}


@pytest.mark.parametrize(
    "message",
    [
        f'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication failed for user'
        f' "{CANARY}"',
        f'connection to server at "127.0.0.1", port 5432 failed: FATAL:  role "{CANARY}" does not exist',
        f'FATAL:  no pg_hba.conf entry for host "127.0.0.1", user "{CANARY}", database "postgres", no encryption',
        f'FATAL:  role "{CANARY}" is not permitted to log in',
    ],
)
def test_login_failures_are_reduced_to_a_category(message: str) -> None:
    dsn = parse_dsn(f"host=127.0.0.1 user={CANARY} password={PASSWORD}", credentials_source="Secret leaky")
    text = connect_failure(dsn, message)
    assert CANARY not in text
    assert "Secret leaky" in text


def test_require_auth_refusal_keeps_the_method() -> None:
    dsn = parse_dsn(f"host=127.0.0.1 user={CANARY} password={PASSWORD}")
    text = connect_failure(
        dsn,
        'connection to server at "127.0.0.1", port 5432 failed: authentication method requirement "scram-sha-256"'
        " failed: server requested a cleartext password",
    )
    assert 'requirement "scram-sha-256" failed: server requested a cleartext password' in text


@pytest.mark.pg
@pytest.mark.parametrize("user", [PASSWORD, CANARY], ids=["password-as-user", "canary-as-user"])
async def test_failed_login_on_a_real_server_names_the_secret_not_its_values(pg_factory: PgFactory, user: str) -> None:
    server = pg_factory(host=next_host(), hba="password")
    server.create_role("warden", password=PASSWORD)
    target = EngineTarget(
        host=server.host,
        port=server.port,
        dbname="postgres",
        user=user,
        password=PASSWORD,
        sslmode="prefer",
        credentials_source="Secret leaky",
    )
    clock = Stopwatch()
    with pytest.raises(TargetUnreachable) as caught:
        await target.evaluate(spec_of(), policy="ns/leaky", target=f"{server.host}:{server.port}")
    await target.close()
    message = str(caught.value)
    exposed = sum(value in message for value in (PASSWORD, CANARY))
    assert "authentication failed for the user in Secret leaky" in message
    assert exposed == 0
    report_figures(
        "secret as user name",
        "usernameKey pointed at a Secret value (engine)",
        detect_s=clock(),
        secrets_exposed=exposed,
    )


@pytest.mark.parametrize("key", ["password", "unused"])
def test_non_utf8_value_is_credentials_invalid_naming_the_key(key: str) -> None:
    values = {"username": b"warden", "password": b"pw", key: b"\xff\xfe-" + PASSWORD.encode()}
    with pytest.raises(CredentialsError) as caught:
        _credentials_data("ns", "binary", secret({CREDENTIALS_LABEL: "true"}, **values))
    assert caught.value.reason == ConditionReason.CREDENTIALS_INVALID
    assert repr(key) in str(caught.value)
    assert PASSWORD not in str(caught.value)
