"""The controller's address check reads the pod itself: gone, leaving, moved or unreadable all refuse."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from pgwarden.enforcement.kube import PodAddressCheck, PodMoved
from pgwarden.enforcement.targets import PodInfo

POD = PodInfo("db-0", "ns", "Running", "127.0.0.2", {"app": "pg"})


class FakePods:
    def __init__(self, answer: dict[str, Any] | Exception | None) -> None:
        self.answer = answer
        self.reads: list[tuple[str, str]] = []

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append((namespace, name))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_the_pod_still_at_its_address_passes() -> None:
    pods = FakePods({"metadata": {"name": "db-0"}, "status": {"podIP": "127.0.0.2", "phase": "Running"}})
    await PodAddressCheck(pods)(POD)  # type: ignore[arg-type]
    assert pods.reads == [("ns", "db-0")]


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (None, "no longer exists"),
        ({"metadata": {"deletionTimestamp": "2026-12-01T00:00:00Z"}, "status": {"podIP": "127.0.0.2"}}, "deleted"),
        ({"metadata": {}, "status": {"podIP": "127.0.0.7"}}, "now has address 127.0.0.7, not 127.0.0.2"),
        ({"metadata": {}, "status": {}}, "now has address None"),
        (ApiException(status=503), "could not be read to confirm its address (503)"),
        (TimeoutError(), "could not be read to confirm its address (TimeoutError)"),
    ],
)
async def test_anything_else_refuses(answer: dict[str, Any] | Exception | None, says: str) -> None:
    with pytest.raises(PodMoved, match=says.replace("(", r"\(").replace(")", r"\)")):
        await PodAddressCheck(FakePods(answer))(POD)  # type: ignore[arg-type]
