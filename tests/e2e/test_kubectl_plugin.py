"""`kubectl pgwarden` for real: the declared console script as a subprocess, against kube-apiserver + etcd.

`status` reads status written by a running operator (and, where the table's columns and the kubeconfig
handling are what is tested, status patched directly); one run goes through the real kubectl, which finds
the plugin on PATH. `explain --dsn` runs against real PostgreSQL: its pids are compared with what
`pgwarden enforce --dry-run --once` acts on, and the server's own log proves nothing was signalled.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from pgwarden.policy.api import GROUP, KIND, PLURAL, VERSION, ConditionReason, SkipReason
from tests.fixtures.operator import OperatorFactory
from tests.fixtures.postgres import PgFactory
from tests.harness.cli import CODE_UNDER_TEST, PGWARDEN, console_script
from tests.harness.controlplane import ControlPlane
from tests.harness.k8s import MERGE_PATCH, create_running_pod, new_namespace
from tests.harness.ledger import Ledger
from tests.harness.policies import (
    create_policy,
    create_secret,
    get_policy,
    next_host,
    open_app_sessions,
    policy_body,
    prepare_server,
)
from tests.harness.postgres import PgServer, free_port, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

SCRIPT = "kubectl-pgwarden"
TIMEOUT = 60.0


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A PATH directory holding the `kubectl-pgwarden` script pyproject.toml declares."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    console_script(SCRIPT, bindir)
    return bindir


def plugin(
    plugin_dir: Path, *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the script as a user would, KUBECONFIG naming the cluster unless `kubeconfig` is None."""
    env = dict(CODE_UNDER_TEST)
    env.pop("KUBECONFIG", None)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    done = subprocess.run(
        [str(plugin_dir / SCRIPT), *args], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if check:
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


def table_rows(text: str) -> list[list[str]]:
    """A table's rows as cells: columns are separated by three or more spaces, cells hold at most two."""
    lines = [line for line in text.splitlines() if line.strip()]
    return [[cell.strip() for cell in line.split("   ") if cell.strip()] for line in lines]


# -- status and explain from a running operator's status ---------------------------------------------------


def test_status_and_explain_read_a_dry_run_policy_status_written_by_the_operator(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    pg_factory: PgFactory,
    run_operator: OperatorFactory,
    plugin_dir: Path,
) -> None:
    server = pg_factory(host=next_host(), hba="password")
    prepare_server(server)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, server.host)
    sessions = set(open_app_sessions(server, 2))
    run_operator([namespace])
    create_policy(k8s_api, namespace, policy_body("watch", server.port, mode="dryRun", state_age="1s"))

    def would_act_on_both() -> dict[str, Any] | None:
        targets = (get_policy(k8s_api, namespace, "watch").get("status") or {}).get("targets") or []
        acted = {a["pid"] for t in targets for a in t.get("lastActions") or []}
        return targets[0] if acted == sessions else None

    entry = wait_for(would_act_on_both, timeout=30, message="the dry run's would-be actions in the status")
    kubeconfig = control_plane.kubeconfig

    (row,) = as_json(plugin(plugin_dir, "status", "-n", namespace, "-o", "json", kubeconfig=kubeconfig))["items"]
    assert (row["namespace"], row["policy"], row["mode"], row["ready"]) == (namespace, "watch", "dry run", "True")
    assert (row["pod"], row["enforcer"], row["error"]) == ("db-0", "controller", None)
    assert row["backends"] == entry["backends"]  # what the operator wrote, unchanged
    assert row["backends"]["client backend"] >= 2
    assert row["clientStates"]["idle"] >= 2
    assert {a["pid"] for a in row["lastActions"]} == sessions
    assert all(a["done"] is False for a in row["lastActions"])

    header, cells = table_rows(plugin(plugin_dir, "status", "-n", namespace, kubeconfig=kubeconfig).stdout)
    assert header[:5] == ["NAMESPACE", "POLICY", "MODE", "READY", "POD"]
    assert cells[:6] == [namespace, "watch", "dry run", "True", "db-0", "controller"]
    assert "would terminate 2 (idle)" in cells

    from_status = plugin(plugin_dir, "explain", "watch", "-n", namespace, "-o", "json", kubeconfig=kubeconfig)
    assert from_status.stderr == ""  # the status is of the current generation: no staleness warning
    explained = as_json(from_status)
    assert explained["source"] == "status"
    assert {s["pid"] for s in explained["sessions"]} == sessions
    assert {(s["target"], s["rule"], s["action"], s["crosses"]) for s in explained["sessions"]} == {
        ("db-0", "idle", "terminate", "now")
    }
    assert all(server.alive(pid) for pid in sessions)  # a dry run, and the plugin never touches a database

    # Plugin discovery: the real kubectl finds kubectl-pgwarden on PATH and passes the words after its name.
    env = {**CODE_UNDER_TEST, "PATH": f"{plugin_dir}{os.pathsep}{os.environ['PATH']}", "KUBECONFIG": str(kubeconfig)}
    via_kubectl = subprocess.run(
        [str(control_plane.binaries.kubectl), "pgwarden", "status", "-n", namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert via_kubectl.returncode == 0, via_kubectl.stderr
    assert table_rows(via_kubectl.stdout)[1][:5] == [namespace, "watch", "dry run", "True", "db-0"]


def test_explain_from_status_refuses_an_enforcing_policy(
    control_plane: ControlPlane, k8s_api: client.ApiClient, namespace: str, pgwarden_crds: None, plugin_dir: Path
) -> None:
    create_policy(k8s_api, namespace, policy_body("live", 5432))
    done = plugin(plugin_dir, "explain", "live", "-n", namespace, kubeconfig=control_plane.kubeconfig, check=False)
    assert done.returncode == 2
    assert "--dsn" in done.stderr
    missing = plugin(plugin_dir, "explain", "nope", "-n", namespace, kubeconfig=control_plane.kubeconfig, check=False)
    assert missing.returncode == 1
    assert f'{KIND} "nope" not found' in missing.stderr


def test_explain_dsn_to_an_unreachable_server_exits_3_without_the_password(
    control_plane: ControlPlane, k8s_api: client.ApiClient, namespace: str, pgwarden_crds: None, plugin_dir: Path
) -> None:
    create_policy(k8s_api, namespace, policy_body("live", 5432))
    secret = "never-printed-Pa55"
    dsn = f"host=127.0.0.1 port={free_port()} user=warden password={secret} connect_timeout=2"
    args = ["explain", "live", "-n", namespace, "--dsn", dsn]
    done = plugin(plugin_dir, *args, kubeconfig=control_plane.kubeconfig, check=False)
    assert done.returncode == 3, done.stderr
    assert "127.0.0.1" in done.stderr
    assert secret not in done.stderr + done.stdout


# -- status columns and kubeconfig handling, with status patched directly --------------------------------------

TWO_HOURS_AGO = (datetime.now(UTC) - timedelta(hours=2, minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
FAILING_STATUS: dict[str, Any] = {
    "conditions": [
        {
            "type": "Ready",
            "status": "False",
            "reason": ConditionReason.TARGET_ERRORS.value,
            "message": "1 of 2 targets failed: db-0: connection refused",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ],
    "targetCount": 2,
    "readyTargets": 1,
    "targets": [
        {"pod": "db-0", "enforcer": "controller", "error": "connection to 127.0.9.1:5432 refused"},
        {
            "pod": "db-1",
            "enforcer": "sidecar",
            "backends": {"client backend": 4, "checkpointer": 1},
            "clientStates": {"active": 1, "idle": 3},
            "lastActionTime": TWO_HOURS_AGO,
            "lastActions": [
                {"rule": "idle", "action": "terminate", "pid": 101, "done": True},
                {"rule": "idle", "action": "terminate", "pid": 102, "done": True},
                {"rule": "long", "action": "cancel", "pid": 103, "done": True},
            ],
            "skipped": {SkipReason.NOT_PERMITTED.value: 2},
        },
    ],
}


def two_context_kubeconfig(control_plane: ControlPlane, path: Path, namespace: str) -> Path:
    """The admin kubeconfig plus a current context `dead` (nothing listens there) and `good` (namespace set)."""
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    (cluster,) = config["clusters"]
    (context,) = config["contexts"]
    dead = {"name": "dead", "cluster": {**cluster["cluster"], "server": f"https://127.0.0.1:{free_port()}"}}
    config["clusters"].append(dead)
    config["contexts"] = [
        {"name": "dead", "context": {**context["context"], "cluster": "dead"}},
        {"name": "good", "context": {**context["context"], "namespace": namespace}},
    ]
    config["current-context"] = "dead"
    path.write_text(yaml.safe_dump(config))
    return path


def test_status_rows_per_target_across_namespaces_with_context_and_its_namespace(
    control_plane: ControlPlane,
    k8s_api: client.ApiClient,
    namespace: str,
    pgwarden_crds: None,
    plugin_dir: Path,
    tmp_path: Path,
) -> None:
    other = new_namespace(k8s_api)
    create_policy(k8s_api, namespace, policy_body("failing", 5432))
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "failing", {"status": FAILING_STATUS}, _content_type=MERGE_PATCH
    )
    create_policy(k8s_api, other, policy_body("fresh", 5432))
    kubeconfig = two_context_kubeconfig(control_plane, tmp_path / "kubeconfig", namespace)

    # The current context's server is down: the failure is said, with kubectl's exit code for it.
    down = plugin(plugin_dir, "status", kubeconfig=kubeconfig, check=False)
    assert down.returncode == 1
    assert "cannot reach the API server" in down.stderr

    # --context picks the context, and its namespace is the default one (flags after or before the subcommand).
    for args in (["status", "--context", "good"], ["--context", "good", "status"]):
        items = as_json(plugin(plugin_dir, *args, "-o", "json", kubeconfig=kubeconfig))["items"]
        assert [(r["namespace"], r["pod"]) for r in items] == [(namespace, "db-0"), (namespace, "db-1")]
    failing, acting = as_json(plugin(plugin_dir, "status", "--context", "good", "-o", "json", kubeconfig=kubeconfig))[
        "items"
    ]
    assert (failing["ready"], failing["mode"]) == ("False (TargetErrors)", "enforce")
    assert failing["error"] == "connection to 127.0.9.1:5432 refused"
    assert (acting["enforcer"], acting["error"], acting["skipped"]) == ("sidecar", None, {"notPermitted": 2})

    # --kubeconfig as a flag, -A: both namespaces (the shared control plane holds other tests' policies too).
    wide = plugin(plugin_dir, "status", "-A", "--kubeconfig", str(kubeconfig), "--context", "good")
    ours = [r for r in table_rows(wide.stdout)[1:] if r[0] in (namespace, other)]
    expected = [
        [namespace, "failing", "enforce", "False (TargetErrors)", "db-0", "controller", "-", "-", "-", "-", "-",
         "connection to 127.0.9.1:5432 refused"],
        [namespace, "failing", "enforce", "False (TargetErrors)", "db-1", "sidecar",
         "checkpointer=1,client backend=4", "active=1,idle=3", "cancel 1 (long); terminate 2 (idle)",
         "2h ago", "notPermitted=2", "-"],
        [other, "fresh", "enforce", "Unknown", "-", "-", "-", "-", "-", "-", "-", "-"],
    ]  # fmt: skip
    assert ours == sorted(expected, key=lambda row: row[0])  # by namespace, then policy, then pod


def test_status_without_rbac_says_forbidden_and_never_prints_the_token(
    control_plane: ControlPlane, namespace: str, pgwarden_crds: None, plugin_dir: Path, tmp_path: Path
) -> None:
    token = control_plane.token_for(namespace, "nobody")  # a ServiceAccount no Role grants anything
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "nobody.kubeconfig")
    done = plugin(plugin_dir, "status", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert done.returncode == 1
    assert "the API server answered 403 Forbidden" in done.stderr
    assert f'"system:serviceaccount:{namespace}:nobody" cannot list resource "postgrespolicies"' in done.stderr
    assert token not in done.stderr + done.stdout


# -- explain with the CLI engine against a DSN ---------------------------------------------------------------


def explain_policy(name: str) -> dict[str, Any]:
    """Idle `web` sessions past 1 s, two a cycle; idle `batch` sessions after an hour."""
    body = policy_body(name, 5432, state_age="1s", limits={"maxActionsPerCycle": 2, "maxFractionPerCycle": 1.0})
    body["spec"]["exclude"] = {}
    body["spec"]["sessions"].append(
        {"name": "batch", "action": "cancel", "states": ["idle"], "stateAge": "1h", "applicationNames": ["batch"]}
    )
    return body


def test_explain_dsn_lists_exactly_what_a_dry_run_acts_on_and_who_crosses_next_signalling_nothing(
    k8s_api: client.ApiClient,
    namespace: str,
    pgwarden_crds: None,
    control_plane: ControlPlane,
    pg: PgServer,
    ledger: Ledger,
    plugin_dir: Path,
    tmp_path: Path,
) -> None:
    body = explain_policy("explained")
    create_policy(k8s_api, namespace, body)
    doomed = [pg.open_session("idle", application_name="web").pid for _ in range(3)]
    later = {pg.open_session("idle", application_name="batch").pid for _ in range(2)}
    busy = pg.open_session("active", application_name="web").pid
    other = pg.open_session("idle", application_name="other").pid
    in_state_since = (
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND state_change < now() - interval '1.5 seconds'"
    )
    wait_for(lambda: pg.execute(in_state_since, (doomed,))[0][0] == 3, message="the web sessions to pass 1 s idle")

    # What the CLI engine's dry run acts on, from the same spec, read back from the cluster.
    stored = get_policy(k8s_api, namespace, "explained")
    policy_path = tmp_path / "policy.yaml"
    document = {"apiVersion": stored["apiVersion"], "kind": KIND, "metadata": {"name": "explained"}}
    policy_path.write_text(yaml.safe_dump({**document, "spec": stored["spec"]}))
    command = [PGWARDEN, "enforce", "--dsn", pg.dsn(), "--policy", str(policy_path), "--dry-run", "--once"]
    dry = subprocess.run(
        [*command, "--output", "json"], env=CODE_UNDER_TEST, capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    report = json.loads(dry.stdout)
    acted = {a["pid"] for a in report["actions"]}
    held = {s["pid"] for s in report["skipped"] if s["reason"] == SkipReason.MAX_ACTIONS}
    assert len(acted) == 2
    assert acted | held == set(doomed)

    args = ["explain", "explained", "-n", namespace, "--dsn", pg.dsn(), "--kubeconfig", str(control_plane.kubeconfig)]
    explained = as_json(plugin(plugin_dir, *args, "-o", "json"))
    assert explained["source"] == "dsn"
    sessions = explained["sessions"]
    now = [s for s in sessions if s["crosses"] == "now" and s["heldBack"] is None]
    held_back = [s for s in sessions if s["heldBack"] is not None]
    upcoming = [s for s in sessions if s["crosses"] != "now"]
    assert {s["pid"] for s in now} == acted  # exactly what the dry run acts on
    assert {(s["pid"], s["heldBack"]) for s in held_back} == {(pid, SkipReason.MAX_ACTIONS.value) for pid in held}
    assert {s["pid"] for s in upcoming} == later
    assert {(s["rule"], s["action"], s["applicationName"], s["state"]) for s in upcoming} == {
        ("batch", "cancel", "batch", "idle")
    }
    assert all(3500 < s["crossesInSeconds"] <= 3600 for s in upcoming)
    assert all(s["stateAgeSeconds"] is not None and s["stateAgeSeconds"] >= 1 for s in now)
    assert {busy, other}.isdisjoint(s["pid"] for s in sessions)

    text = plugin(plugin_dir, *args, "--next", "1").stdout
    assert text.startswith(f"{KIND} {namespace}/explained, from a dry-run cycle and look-ahead on ")
    rows = table_rows(text)[1:]
    assert rows[0][:4] == ["TARGET", "RULE", "ACTION", "PID"]
    assert sum(1 for r in rows if r[-1].startswith("in 59m")) == 1  # --next 1: one later crossing
    assert sum(1 for r in rows if r[-1] == f"now, held back: {SkipReason.MAX_ACTIONS}") == len(held)

    # Nothing was signalled, by anyone: every session is there, and the server logged no signalling statement.
    assert all(pg.alive(pid) for pid in [*doomed, *later, busy, other])
    assert ledger.signals() == []
    assert ledger.terminated() == []
    assert ledger.cancelled() == []
