"""Names only the kopf controller uses (the API's words shared with the sidecar live in pgwarden.policy.api)."""

from typing import Final

PEERING_NAME: Final = "pgwarden"
"""The ClusterKopfPeering (or namespaced KopfPeering) the replicas peer through."""
