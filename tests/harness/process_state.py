"""The processes a long-lived harness (`make devcluster`, `make cluster`) started, as recorded in a state file.

A later `down` must stop exactly those: a pid is trusted only while it still runs the recorded executable,
never a recycled pid of something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness.controlplane import pid_alive


def read_state(path: Path) -> dict[str, Any] | None:
    """The recorded state, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_ours(pid: int, executable: str) -> bool:
    """Whether `pid` still runs `executable` (and is not a recycled pid of something else)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return argv0 == executable and pid_alive(pid)


def live_processes(state: dict[str, Any]) -> dict[str, int]:
    """The recorded processes that are still running, by name."""
    return {name: pid for name, (pid, exe) in state.get("processes", {}).items() if is_ours(pid, exe)}
