"""A PolicyWorker's credentials without the API server (this module holds no tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pgwarden.enforcement.kube import Credentials
from pgwarden.policy import CredentialsSecret


@dataclass(frozen=True)
class FixedCredentials:
    """The controller's SecretReader, minus the API server: every policy gets the same login, so a worker
    can run against servers a test or benchmark started with that role."""

    username: str
    password: str = field(repr=False)

    async def credentials(self, namespace: str, ref: CredentialsSecret) -> Credentials:
        return Credentials(self.username, self.password)

    def invalidate(self, namespace: str, name: str) -> None:
        """Nothing cached here."""
