"""The CLI image entrypoint on the real node: manifests/examples/enforce-job.yaml run as shipped.

Only the image changes (localhost/pgwarden:dev, imagePullPolicy Never: no registry here) and the policy's
stateAge (2 s instead of ten minutes, as the other tests shorten the idle-reaper's). The Job reaches the
StatefulSet's PostgreSQL pod through a ClusterIP Service `postgres-rw`, as the example says, with the
password from the credentials Secret in PGPASSWORD. The operator is not involved: no policy object exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.cluster.conftest import kubectl, kubectl_json
from tests.cluster.postgres_pod import (
    APP_PASSWORD,
    REAP_TIMEOUT,
    ROLE_PASSWORD,
    alive,
    apply,
    credentials_secret,
    open_idle,
    pids,
    start_postgres,
    superuser,
)
from tests.harness.postgres import wait_for

pytestmark = pytest.mark.cluster

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
EXAMPLE = MANIFESTS / "examples" / "enforce-job.yaml"
STATE_AGE = 2.0  # seconds


def example_as_shipped() -> tuple[dict[str, Any], dict[str, Any]]:
    """The example's ConfigMap and Job, with the local image and a 2 s stateAge."""
    config_map, job = yaml.safe_load_all(EXAMPLE.read_text())
    policy = yaml.safe_load(config_map["data"]["policy.yaml"])
    (rule,) = policy["spec"]["sessions"]
    rule["stateAge"] = f"{STATE_AGE:g}s"
    config_map["data"]["policy.yaml"] = yaml.safe_dump(policy)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    deployment = yaml.safe_load((MANIFESTS / "operator" / "deployment.yaml").read_text())
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]  # in step
    container["image"] = "localhost/pgwarden:dev"
    container["imagePullPolicy"] = "Never"
    return dict(config_map), dict(job)


def rw_service(namespace: str) -> dict[str, Any]:
    """The ClusterIP Service the example expects in front of the server."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "postgres-rw", "namespace": namespace},
        "spec": {"selector": {"app": "postgres"}, "ports": [{"name": "pg", "port": 5432, "targetPort": 5432}]},
    }


def idle_for_longer_than(host: str, backend_pids: list[int], seconds: float) -> bool:
    """Every backend in `backend_pids` idle for more than `seconds` by the server's own clock."""
    with superuser(host) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'idle'"
            " AND now() - state_change > make_interval(secs => %s)",
            (backend_pids, seconds),
        ).fetchone()
    return rows is not None and rows[0] == len(backend_pids)


def job_finished(namespace: str) -> str | None:
    conditions = kubectl_json("get", "job", "pgwarden-enforce", "-n", namespace).get("status", {}).get("conditions")
    done = [c["type"] for c in conditions or [] if c["status"] == "True" and c["type"] in ("Complete", "Failed")]
    return done[0] if done else None


def reports(log: str) -> list[dict[str, Any]]:
    """The JSON report lines of the Job's log (stdout; its own logs are JSON on stderr, with `event`)."""
    found = []
    for line in log.splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict) and "actions" in document:
            found.append(document)
    return found


def test_enforce_job_example_reaps_idle_sessions_through_the_service(namespace: str) -> None:
    host = start_postgres(namespace)
    apply(namespace, rw_service(namespace))
    service_ip = kubectl_json("get", "service", "postgres-rw", "-n", namespace)["spec"]["clusterIP"]
    doomed = open_idle(host, 3)
    busy = psycopg.connect(host=host, user="app", password=APP_PASSWORD, dbname="postgres", application_name="web")
    busy.execute("SELECT 1")  # idle in transaction: not `idle`, so the rule must leave it alone
    fresh: list[psycopg.Connection[Any]] = []
    try:
        doomed_pids = pids(doomed)
        apply(namespace, credentials_secret(namespace))
        wait_for(
            lambda: idle_for_longer_than(host, doomed_pids, STATE_AGE + 0.5),
            timeout=30,
            interval=0.2,
            message="sessions idle past stateAge",
        )
        fresh = open_idle(host, 1)  # idle, but younger than stateAge when the Job looks: stays
        config_map, job = example_as_shipped()
        # From here on, pods of the namespace must meet the `restricted` Pod Security Standard, as the
        # operator's own namespace requires: the Job's pod is admitted only if its security settings do.
        kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
        started = time.monotonic()
        apply(namespace, config_map, job)
        outcome = wait_for(lambda: job_finished(namespace), timeout=REAP_TIMEOUT, interval=0.5, message="Job done")
        log = kubectl("logs", "job/pgwarden-enforce", "-n", namespace).stdout
        assert outcome == "Complete", log
        assert time.monotonic() - started < REAP_TIMEOUT

        assert not alive(host, doomed_pids)
        kept = [busy.info.backend_pid, *pids(fresh)]
        assert alive(host, kept) == set(kept)
        (report,) = reports(log)
        assert report["policy"] == "reap-idle"
        assert report["enforcementAction"] == "enforce"
        assert report["target"].startswith(service_ip)
        assert report["errors"] == []
        assert sorted(a["pid"] for a in report["actions"]) == sorted(doomed_pids)
        assert all(a["done"] and a["rule"] == "idle" and a["user"] == "app" for a in report["actions"])
        # The password came from the Secret through the environment: not in the pod's command line, nor output.
        (pod,) = kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=pgwarden-enforce")["items"]
        (container,) = pod["spec"]["containers"]
        assert ROLE_PASSWORD not in json.dumps(container["args"]) + json.dumps(container.get("command"))
        assert ROLE_PASSWORD not in log
    finally:
        busy.close()
        for conn in doomed + fresh:
            conn.close()
