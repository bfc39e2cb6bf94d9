"""The Secret cache forgets: entries (and the credentials they hold) for Secrets no policy reads any more
are dropped once expired, instead of staying for the life of the process."""

from __future__ import annotations

import base64
import contextlib
from types import SimpleNamespace
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from pgwarden.enforcement.kube import CredentialsError, SecretReader
from pgwarden.policy import CredentialsSecret
from pgwarden.policy.api import CREDENTIALS_LABEL


class FakeCore:
    """read_namespaced_secret only: labelled Secrets for any name, 404 for names starting with `gone`."""

    def __init__(self) -> None:
        self.reads = 0

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        self.reads += 1
        if name.startswith("gone"):
            raise ApiException(status=404)
        data = {"username": base64.b64encode(b"warden").decode(), "password": base64.b64encode(b"pw").decode()}
        return SimpleNamespace(metadata=SimpleNamespace(labels={CREDENTIALS_LABEL: "true"}), data=data)


async def test_expired_entries_of_secrets_no_longer_read_are_dropped() -> None:
    now = [0.0]
    with client.ApiClient() as api:
        reader = SecretReader(api, ttl=30.0, clock=lambda: now[0])
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
