"""`ensure_peering`: what `pgwarden run` does about its peering object before kopf starts, per API answer.

The forbidden paths need an RBAC-enforcing API server with a narrow identity; the answers are simulated here
(the e2e tests in tests/e2e/test_peering.py cover the absent CRD and creation on a real API server).
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from pgwarden.enforcement.kube import PeeringUnavailable, ensure_peering


class FakeCustomObjects:
    """Answers create with `create` (None: created) and list with `found` (an int: that HTTP error)."""

    def __init__(self, create: int | None, found: list[dict[str, Any]] | int = 0) -> None:
        self.create = create
        self.found = found
        self.created: list[dict[str, Any]] = []

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.create is not None:
            raise ApiException(status=self.create)
        self.created.append(body)
        return body

    def create_cluster_custom_object(
        self, group: str, version: str, plural: str, body: dict[str, Any], **_: Any
    ) -> Any:
        assert (group, version, plural) == ("kopf.dev", "v1", "clusterkopfpeerings")
        return self._create(body)

    def create_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, body: Any, **_: Any
    ) -> Any:
        assert (group, version, plural) == ("kopf.dev", "v1", "kopfpeerings")
        assert body["metadata"] == {"name": "pgwarden", "namespace": ns}
        return self._create(body)

    def _list(self, field_selector: str) -> dict[str, Any]:
        assert field_selector == "metadata.name=pgwarden"
        if isinstance(self.found, int):
            raise ApiException(status=self.found)
        return {"items": self.found}

    def list_cluster_custom_object(self, *_: str, field_selector: str, **__: Any) -> dict[str, Any]:
        return self._list(field_selector)

    def list_namespaced_custom_object(self, *_: str, field_selector: str, **__: Any) -> dict[str, Any]:
        return self._list(field_selector)


def with_api(monkeypatch: pytest.MonkeyPatch, fake: FakeCustomObjects) -> None:
    monkeypatch.setattr(client, "CustomObjectsApi", lambda _api: fake)


@pytest.mark.parametrize("namespaces", [None, ["a", "b"]], ids=["cluster-wide", "namespaced"])
def test_created_when_missing_and_allowed(monkeypatch: pytest.MonkeyPatch, namespaces: list[str] | None) -> None:
    fake = FakeCustomObjects(create=None)
    with_api(monkeypatch, fake)
    outcomes = ensure_peering(None, "pgwarden", namespaces)  # type: ignore[arg-type]
    assert outcomes == ["created"] * (1 if namespaces is None else 2)
    kinds = {body["kind"] for body in fake.created}
    assert kinds == ({"ClusterKopfPeering"} if namespaces is None else {"KopfPeering"})


def test_an_existing_object_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with_api(monkeypatch, FakeCustomObjects(create=409))
    assert ensure_peering(None, "pgwarden", None) == ["exists"]  # type: ignore[arg-type]


def test_forbidden_to_create_but_present_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    with_api(monkeypatch, FakeCustomObjects(create=403, found=[{"metadata": {"name": "pgwarden"}}]))
    assert ensure_peering(None, "pgwarden", ["a"]) == ["exists"]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("namespaces", "crd"),
    [(None, "clusterkopfpeerings.kopf.dev"), (["a"], "kopfpeerings.kopf.dev")],
    ids=["cluster-wide", "namespaced"],
)
@pytest.mark.parametrize(
    ("create", "found", "says"),
    [
        (404, 0, "is not installed"),
        (403, [], "does not exist and this identity may not create it"),
        (403, 403, "may neither create nor list it"),
    ],
    ids=["no-crd", "forbidden-absent", "forbidden-unlistable"],
)
def test_refused_with_the_crd_the_object_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
    namespaces: list[str] | None,
    crd: str,
    create: int,
    found: list[dict[str, Any]] | int,
    says: str,
) -> None:
    with_api(monkeypatch, FakeCustomObjects(create=create, found=found))
    with pytest.raises(PeeringUnavailable) as refused:
        ensure_peering(None, "pgwarden", namespaces)  # type: ignore[arg-type]
    message = str(refused.value)
    assert crd in message
    assert "'pgwarden'" in message
    assert says in message
    assert "--standalone" in message
    if namespaces:
        assert "namespace a" in message


def test_other_api_errors_are_not_mistaken_for_a_missing_object(monkeypatch: pytest.MonkeyPatch) -> None:
    with_api(monkeypatch, FakeCustomObjects(create=500))
    with pytest.raises(ApiException):
        ensure_peering(None, "pgwarden", None)  # type: ignore[arg-type]
