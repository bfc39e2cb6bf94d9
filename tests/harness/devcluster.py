"""A long-lived control plane for working by hand: `python -m tests.harness.devcluster up|status|down`.

The test suite starts and stops its own control plane in temp dirs; developers also want one that stays
up between commands to try manifests and run the operator against. This is the same `ControlPlane`,
detached: its processes outlive `up`, their pids are recorded in `.devcluster/state.json`, and `down`
stops them. Everything lives under `.devcluster/` in the repo root and ports are chosen free, so a
devcluster and test runs never collide.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any

from tests.harness.controlplane import ControlPlane, terminate
from tests.harness.controlplane_assets import ETCD_VERSION, K8S_VERSION, REPO_ROOT
from tests.harness.process_state import live_processes, read_state

STATE_DIR = REPO_ROOT / ".devcluster"
STATE_FILE = STATE_DIR / "state.json"
KUBECONFIG = STATE_DIR / "kubeconfig"
KUBECTL = STATE_DIR / "bin" / "kubectl"
STOP_ORDER = ("kube-apiserver", "etcd")  # the API server first, so it never runs without its store


def _stop(state: dict[str, Any]) -> None:
    live = live_processes(state)
    for name in STOP_ORDER:
        if name in live:
            terminate(live[name])


def _record(plane: ControlPlane) -> dict[str, Any]:
    executables = {"etcd": str(plane.binaries.etcd), "kube-apiserver": str(plane.binaries.kube_apiserver)}
    state = {
        "server": plane.server,
        "etcd": plane.etcd_url,
        "processes": {name: [pid, executables[name]] for name, pid in plane.pids.items()},
        "logs": str(plane.basedir),
    }
    STATE_FILE.write_text(json.dumps(state, indent=2) + "\n")
    return state


def _usage(state: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"kube-apiserver {K8S_VERSION} (etcd {ETCD_VERSION}) at {state['server']}",
            "Use it from this shell with:",
            f"  export KUBECONFIG={KUBECONFIG}",
            f"  export PATH={KUBECTL.parent}:$PATH   # kubectl {K8S_VERSION}, matching the server",
            "  kubectl get namespaces",
            "No kubelet, scheduler or controller-manager runs: Pods stay Pending unless their status is set.",
            f"Logs: {state['logs']}/*.log    Stop with: make devcluster-down",
        ]
    )


def up() -> int:
    state = read_state(STATE_FILE)
    if state is not None and len(live_processes(state)) == len(STOP_ORDER):
        print("devcluster is already running.")
        print(_usage(state))
        return 0
    if state is not None:
        print("devcluster state found but its processes are gone; starting afresh.", file=sys.stderr)
        _stop(state)
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir()
    plane = ControlPlane(basedir=STATE_DIR / "run", kubeconfig=KUBECONFIG)
    try:
        plane.start()
    except BaseException:
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        raise
    state = _record(plane)
    KUBECTL.parent.mkdir()
    KUBECTL.symlink_to(plane.binaries.kubectl)
    print(f"devcluster up in {plane.timings['total']:.1f}s.")
    print(_usage(state))
    return 0  # leaving `plane` unstopped on purpose: its processes run in their own sessions


def status() -> int:
    state = read_state(STATE_FILE)
    if state is None:
        print("devcluster is not running.")
        return 1
    live = live_processes(state)
    for name in STOP_ORDER:
        print(f"{name:15} {'running, pid ' + str(live[name]) if name in live else 'not running'}")
    if len(live) != len(STOP_ORDER):
        return 1
    print(_usage(state))
    return 0


def down() -> int:
    state = read_state(STATE_FILE)
    if state is None:
        print("devcluster is not running.")
    else:
        _stop(state)
        print("devcluster stopped.")
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.devcluster", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "status", "down"))
    command = parser.parse_args(argv).command
    return {"up": up, "status": status, "down": down}[command]()


if __name__ == "__main__":
    sys.exit(main())
