"""The Secret-reading attack end to end: real API server, real PostgreSQL, the operator as a subprocess.

A policy author who may not read Secrets points `usernameKey` at the password key, or at another key
holding a canary; the login fails, and the values must appear nowhere a policy author can look: status,
Events, the operator's log, /metrics. A Secret without the opt-in label is not used at all: no
connection is even attempted (counted at a relay standing at the pod's IP).
"""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
from kubernetes import client

from pgwarden.policy.api import CREDENTIALS_LABEL, ConditionReason
from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.faults import Relay, Stopwatch, report_figures
from tests.harness.k8s import create_running_pod
from tests.harness.policies import condition, create_policy, events, get_policy, policy_body
from tests.harness.postgres import free_port, holds_for, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

_octets = itertools.count(10)
PASSWORD = "Leak-E2E-Pa55w0rd-3b8d"
CANARY = "canary-e2e-0c41f9aa"


def next_host() -> str:
    return f"127.0.{next(_octets)}.43"


def create_secret(api: client.ApiClient, namespace: str, name: str, *, labelled: bool) -> None:
    values = {"username": b"warden", "password": PASSWORD.encode(), "canary": CANARY.encode()}
    metadata: dict[str, Any] = {"name": name}
    if labelled:
        metadata["labels"] = {CREDENTIALS_LABEL: "true"}
    data: dict[str, bytes | str] = {k: base64.b64encode(v).decode() for k, v in values.items()}
    body = client.V1Secret(metadata=client.V1ObjectMeta(**metadata), data=data)
    client.CoreV1Api(api).create_namespaced_secret(namespace, body)


def with_secret(body: dict[str, Any], name: str, username_key: str, pod_label: str) -> dict[str, Any]:
    body["spec"]["connection"]["credentialsSecret"] = {"name": name, "usernameKey": username_key}
    body["spec"]["selector"] = {"matchLabels": {"app": pod_label}}
    return body


def target_errors(api: client.ApiClient, namespace: str, name: str) -> list[str]:
    status = get_policy(api, namespace, name).get("status") or {}
    return [str(t["error"]) for t in status.get("targets") or [] if t.get("error")]


def test_secret_values_never_leak_and_unlabelled_secrets_are_never_used(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    server = pg_factory(host=next_host(), hba="password")
    server.create_role("warden", password=PASSWORD, grants=("pg_signal_backend", "pg_read_all_stats"))
    relay_host = next_host()
    with Relay(relay_host, free_port(relay_host), (server.host, server.port)) as relay:
        create_secret(k8s_api, namespace, "leaky", labelled=True)
        create_secret(k8s_api, namespace, "plain", labelled=False)
        create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
        create_running_pod(k8s_api, namespace, "relayed-0", {"app": "relayed"}, relay_host)
        operator = run_operator([namespace])
        clock = Stopwatch()
        for name, key in (("password-as-user", "password"), ("canary-as-user", "canary")):
            create_policy(k8s_api, namespace, with_secret(policy_body(name, server.port), "leaky", key, "pg"))
        create_policy(
            k8s_api, namespace, with_secret(policy_body("unlabelled", relay.port), "plain", "username", "relayed")
        )

        for name in ("password-as-user", "canary-as-user"):
            wait_for(
                lambda name=name: any(  # type: ignore[misc]
                    "authentication failed for the user in Secret leaky" in e
                    for e in target_errors(k8s_api, namespace, name)
                ),
                timeout=60,
                message=f"{name}: a target error naming the Secret",
            )
            degraded = condition(get_policy(k8s_api, namespace, name), "Degraded")
            assert degraded is not None
            assert degraded["status"] == "True"
        detected = clock()

        def not_labelled() -> bool:
            ready = condition(get_policy(k8s_api, namespace, "unlabelled"), "Ready")
            return ready is not None and ready["reason"] == ConditionReason.CREDENTIALS_SECRET_NOT_LABELLED

        wait_for(not_labelled, timeout=60, message="unlabelled: Ready=False CredentialsSecretNotLabelled")
        assert holds_for(lambda: relay.accepted == 0, 3.0)  # and no connection attempt, ever

        # Everywhere a policy author (or anyone reading logs and metrics) can look.
        names = ("password-as-user", "canary-as-user", "unlabelled")
        policies = [get_policy(k8s_api, namespace, n) for n in names]
        seen = {
            "status": json.dumps([p.get("status") for p in policies]),
            "events": json.dumps(
                [
                    e.message
                    for n in ("password-as-user", "canary-as-user", "unlabelled")
                    for e in events(k8s_api, namespace, n)
                ]
            ),
            "log": operator.logs(),
            "metrics": operator.metrics(),
        }
        exposed = [
            f"{value} in {where}" for where, text in seen.items() for value in (PASSWORD, CANARY) if value in text
        ]
        report_figures(
            "secret-reading policy",
            "usernameKey at the password / a canary key; unlabelled Secret (operator, real PG)",
            detect_s=detected,
            secrets_exposed=len(exposed),
        )
        assert exposed == []


def test_non_utf8_secret_value_is_reported_and_the_operator_keeps_enforcing(
    k8s_api: client.ApiClient, namespace: str, pg_factory: PgFactory, run_operator: OperatorFactory
) -> None:
    server = pg_factory(host=next_host(), hba="password")
    server.create_role("warden", password=PASSWORD, grants=("pg_signal_backend", "pg_read_all_stats"))
    server.create_role("app", password=PASSWORD)
    create_secret(k8s_api, namespace, "good", labelled=True)
    binary: dict[str, bytes | str] = {
        "username": base64.b64encode(b"warden").decode(),
        "password": base64.b64encode(PASSWORD.encode()).decode(),
        "tls.key": base64.b64encode(b"\x30\x82\xff\xfe binary").decode(),  # unused by the policy, still refused
    }
    metadata = client.V1ObjectMeta(name="binary", labels={CREDENTIALS_LABEL: "true"})
    client.CoreV1Api(k8s_api).create_namespaced_secret(namespace, client.V1Secret(metadata=metadata, data=binary))
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    operator = run_operator([namespace])
    clock = Stopwatch()
    create_policy(k8s_api, namespace, with_secret(policy_body("binary", server.port), "binary", "username", "pg"))

    def invalid() -> dict[str, Any] | None:
        ready = condition(get_policy(k8s_api, namespace, "binary"), "Ready")
        return ready if ready is not None and ready["reason"] == ConditionReason.CREDENTIALS_INVALID else None

    ready = wait_for(invalid, timeout=60, message="Ready=False CredentialsInvalid")
    detected = clock()
    assert ready["status"] == "False"
    assert "'tls.key'" in ready["message"]
    # No crash: the same operator still enforces a policy with usable credentials.
    victim = server.open_session("idle", user="app", password=PASSWORD, application_name="web")
    create_policy(k8s_api, namespace, with_secret(policy_body("good", server.port), "good", "username", "pg"))
    server.wait_gone(victim.pid, timeout=60)
    assert operator.proc.poll() is None
    report_figures("non-UTF-8 Secret value", "binary bytes in an unused key (operator)", detect_s=detected)
