"""The cycle report's JSON is a contract: exact keys, in order, `done` false in dry run, autovacuum only if set."""

from __future__ import annotations

import json

from pgwarden.engine.autovacuum_plan import AutovacuumReport
from pgwarden.engine.report import ActionRecord, CycleReport, SkipRecord, render_text
from pgwarden.policy.api import SkipReason
from pgwarden.policy.model import EnforcementAction


def _report(mode: EnforcementAction = EnforcementAction.ENFORCE, *, done: bool = True) -> CycleReport:
    return CycleReport(
        policy="shop-idle",
        target="10.0.0.5:5432",
        server_version="18.6",
        enforcement_action=mode,
        backends={"autovacuum launcher": 1, "checkpointer": 1, "client backend": 12},
        client_states={"active": 2, "idle": 9, "idle in transaction": 1},
        actions=[
            ActionRecord(
                "idle-connections", "terminate", 4242, "app", "shop", "web", "10.0.0.7", "idle", 612.4321, done
            ),
            ActionRecord("per-user", "terminate", 4244, "app", "shop", "web", None, "idle", None, done),
        ],
        skipped=[SkipRecord("idle-connections", 4243, SkipReason.MAX_ACTIONS)],
        errors=[],
        next_deadline=3.0,
    )


def test_json_contract() -> None:
    out = _report().to_json()
    assert out == {
        "policy": "shop-idle",
        "target": "10.0.0.5:5432",
        "serverVersion": "18.6",
        "enforcementAction": "enforce",
        "backends": {"autovacuum launcher": 1, "checkpointer": 1, "client backend": 12},
        "clientStates": {"active": 2, "idle": 9, "idle in transaction": 1},
        "actions": [
            {
                "rule": "idle-connections",
                "action": "terminate",
                "pid": 4242,
                "user": "app",
                "database": "shop",
                "applicationName": "web",
                "clientAddress": "10.0.0.7",
                "state": "idle",
                "stateAgeSeconds": 612.4,
                "done": True,
            },
            {
                "rule": "per-user",
                "action": "terminate",
                "pid": 4244,
                "user": "app",
                "database": "shop",
                "applicationName": "web",
                "clientAddress": None,
                "state": "idle",
                "stateAgeSeconds": None,
                "done": True,
            },
        ],
        "skipped": [{"rule": "idle-connections", "pid": 4243, "reason": "maxActionsPerCycle"}],
        "errors": [],
    }
    assert list(out) == [
        "policy",
        "target",
        "serverVersion",
        "enforcementAction",
        "backends",
        "clientStates",
        "actions",
        "skipped",
        "errors",
    ]
    assert "\n" not in json.dumps(out)


def test_dry_run_and_autovacuum() -> None:
    report = _report(EnforcementAction.DRY_RUN, done=False)
    assert report.dry_run
    out = report.to_json()
    assert out["enforcementAction"] == "dryRun"
    assert all(a["done"] is False for a in out["actions"])
    assert "autovacuum" not in out
    report.autovacuum = AutovacuumReport(desired=2, dry_run=True, in_force=3, would_write=True)
    assert report.to_json()["autovacuum"] == report.autovacuum.to_json()
    assert report.to_json()["autovacuum"]["maxWorkers"]["wouldWrite"] is True
    assert list(report.to_json())[-1] == "autovacuum"


def test_text_rendering() -> None:
    text = render_text(_report())
    lines = text.splitlines()
    assert lines[0] == "policy shop-idle  target 10.0.0.5:5432  PostgreSQL 18.6  enforce"
    assert "client backend=12" in lines[1]
    assert "idle=9" in lines[2]
    assert any(line.split()[:3] == ["RULE", "ACTION", "PID"] for line in lines)
    row = next(line for line in lines if "4242" in line)
    assert row.split() == [
        "idle-connections",
        "terminate",
        "4242",
        "app",
        "shop",
        "web",
        "10.0.0.7",
        "idle",
        "612.4s",
        "yes",
    ]
    assert "local" in next(line for line in lines if "4244" in line)  # a Unix-socket session
    assert "maxActionsPerCycle" in text
    dry = render_text(_report(EnforcementAction.DRY_RUN, done=False))
    assert "dry run" in dry.splitlines()[0]
    assert "would act (2)" in dry
    empty = CycleReport("p", "t", "15.14", EnforcementAction.ENFORCE, {}, {}, errors=["autovacuum: denied"])
    assert "no actions" in render_text(empty)
    assert "error: autovacuum: denied" in render_text(empty)
