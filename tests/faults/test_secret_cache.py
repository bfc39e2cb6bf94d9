"""The Secret cache forgets: entries (and the credentials they hold) for Secrets no policy reads any more
are dropped once too old to be used, instead of staying for the life of the process. And it remembers just
long enough: while the API server gives no answer, the last good credentials keep enforcement going."""

from __future__ import annotations

import base64
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from pgwarden.enforcement.kube import CredentialsError, SecretReader
from pgwarden.policy import CredentialsSecret
from pgwarden.policy.api import CREDENTIALS_LABEL


class FakeCore:
    """read_namespaced_secret only: labelled Secrets for any name, 404 for names starting with `gone`."""

    def __init__(self) -> None:
        self.reads = 0
        self.password = b"pw"
        self.failure: Exception | None = None  # what every read raises meanwhile (an API outage)
        self.timeouts: list[object] = []

    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self.reads += 1
        self.timeouts.append(kwargs.get("_request_timeout"))
        if self.failure is not None:
            raise self.failure
        if name.startswith("gone"):
            raise ApiException(status=404)
        data = {"username": base64.b64encode(b"warden").decode(), "password": base64.b64encode(self.password).decode()}
        return SimpleNamespace(metadata=SimpleNamespace(labels={CREDENTIALS_LABEL: "true"}), data=data)


async def test_expired_entries_of_secrets_no_longer_read_are_dropped() -> None:
    now = [0.0]
    with client.ApiClient() as api:
        reader = SecretReader(api, ttl=30.0, clock=lambda: now[0], stale_max=0.0)
        core = FakeCore()
        reader._core = core  # type: ignore[assignment]
        for i in range(500):  # 500 policies, each with its own Secret, then deleted
            await reader.credentials("ns", CredentialsSecret(name=f"s{i}"))
            with contextlib.suppress(CredentialsError):
                await reader.credentials("ns", CredentialsSecret(name=f"gone{i}"))
        assert len(reader) == 1000
        await reader.credentials("ns", CredentialsSecret(name="s0"))
        assert core.reads == 1000  # within the ttl: served from the cache
        now[0] = 31.0
        await reader.credentials("ns", CredentialsSecret(name="kept"))  # a policy still running
        assert len(reader) == 1
        now[0] = 40.0
        await reader.credentials("ns", CredentialsSecret(name="kept"))
        assert core.reads == 1001  # still cached: the sweep drops only what expired


async def test_while_the_api_server_gives_no_answer_the_last_good_credentials_are_used() -> None:
    """An API outage (timeouts, 503, connection refused) must not stop enforcement on servers that are fine;
    an answer the server does give (the Secret deleted) always wins over the remembered values."""
    now = [0.0]
    ref = CredentialsSecret(name="db")
    with client.ApiClient() as api:
        reader = SecretReader(api, ttl=30.0, clock=lambda: now[0], timeout=3.0, stale_max=600.0)
        core = FakeCore()
        reader._core = core  # type: ignore[assignment]
        assert (await reader.credentials("ns", ref)).password == "pw"
        assert core.timeouts == [3.0]  # every read is bounded
        for failure in (ApiException(status=503), TimeoutError("read timed out"), ConnectionRefusedError()):
            core.failure = failure
            now[0] += 31.0  # expired: a read is attempted, fails, and the values read before are used
            assert (await reader.credentials("ns", ref)).password == "pw"
        now[0] = 601.0  # too old to stand in any longer: the outage is now the answer
        with pytest.raises(CredentialsError) as outage:
            await reader.credentials("ns", ref)
        assert outage.value.reason == "CredentialsUnavailable"
        assert "pw" not in str(outage.value)
        core.failure, core.password = None, b"rotated"
        assert (await reader.credentials("ns", ref)).password == "rotated"  # the API is back: fresh values
        now[0] += 31.0
        core.failure = ApiException(status=404)  # the server answers: deleted; nothing remembered is used
        with pytest.raises(CredentialsError) as deleted:
            await reader.credentials("ns", ref)
        assert deleted.value.reason == "CredentialsSecretNotFound"
