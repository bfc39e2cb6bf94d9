"""PostgresPolicy objects, their Secret, Events and status for end-to-end tests (this module holds no tests).

Shared by the operator, sidecar, HA, manifest and RBAC tests: each policy and Secret is what a user would
apply, and every read goes to the API server, never to the operator's memory.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any, cast

from kubernetes import client

from pgwarden.policy.api import API_VERSION, CREDENTIALS_LABEL, GROUP, KIND, PLURAL, VERSION
from tests.harness.postgres import PgServer

_octets = itertools.count(10)
PASSWORD = "s3cret-Pa55"  # throwaway, for servers the tests start


def next_host() -> str:
    """A loopback address no other test uses (one 127.0.x.1 per server)."""
    return f"127.0.{next(_octets)}.1"


def prepare_server(server: PgServer) -> None:
    """A least-privilege enforcement role, and an application role whose sessions get reaped."""
    server.create_role("warden", password=PASSWORD, grants=("pg_signal_backend", "pg_read_all_stats"))
    server.create_role("app", password=PASSWORD)


def create_secret(api: client.ApiClient, namespace: str, name: str = "pg-credentials") -> None:
    data: dict[str, bytes | str] = {
        "username": base64.b64encode(b"warden").decode(),
        "password": base64.b64encode(PASSWORD.encode()).decode(),
    }
    metadata = client.V1ObjectMeta(
        name=name, labels={CREDENTIALS_LABEL: "true"}
    )  # pgwarden reads only opted-in Secrets
    client.CoreV1Api(api).create_namespaced_secret(namespace, client.V1Secret(metadata=metadata, data=data))


def policy_body(name: str, port: int, *, mode: str = "enforce", state_age: str = "2s", **spec: Any) -> dict[str, Any]:
    body_spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "pg"}},
        "connection": {"port": port, "credentialsSecret": {"name": "pg-credentials"}},
        "interval": "5s",
        "enforcementAction": mode,
        "limits": {"maxActionsPerCycle": 50, "maxFractionPerCycle": 1.0},
        "sessions": [
            {
                "name": "idle",
                "action": "terminate",
                "states": ["idle"],
                "stateAge": state_age,
                "applicationNames": ["web"],
            }
        ],
        "exclude": {"users": ["postgres"]},
    }
    body_spec.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": body_spec,
    }


def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def create_policy(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> None:
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get_policy(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict(cast(dict[str, Any], custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)))


def policy_gone(api: client.ApiClient, namespace: str, name: str) -> bool:
    try:
        get_policy(api, namespace, name)
    except client.ApiException as exc:
        return bool(exc.status == 404)
    return False


def patch_spec(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    custom(api).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})


def condition(policy: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (policy.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def events(api: client.ApiClient, namespace: str, name: str) -> list[Any]:
    items = client.CoreV1Api(api).list_namespaced_event(namespace).items
    return [e for e in items if e.involved_object.name == name and e.involved_object.kind == "PostgresPolicy"]


def open_app_sessions(server: PgServer, count: int, state: str = "idle") -> list[int]:
    return [
        server.open_session(state, user="app", password=PASSWORD, application_name="web").pid  # type: ignore[arg-type]
        for _ in range(count)
    ]


def terminated_total(api: client.ApiClient, namespace: str, name: str) -> int:
    status = get_policy(api, namespace, name).get("status") or {}
    return int((status.get("totals") or {}).get("terminated", 0))
