"""Running the `pgwarden` command as a user would: the console script, this checkout's code, a policy file."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
PGWARDEN = str(Path(sys.executable).parent / "pgwarden")
CODE_UNDER_TEST = {**os.environ, "PYTHONPATH": str(REPO / "operator")}
"""The console script's environment with this checkout's package first: the shared venv's editable
install points at one checkout, and the test must run the code it sits next to."""


def policy_file(tmp_path: Path, app: str, *, name: str = "demo", extra: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"""
apiVersion: pgwarden.dev/v1alpha1
kind: PostgresPolicy
metadata:
  name: {name}
  namespace: default
spec:
  selector: {{matchLabels: {{app: postgres}}}}
  connection: {{port: 5432, database: postgres}}
  interval: 30s
  limits: {{maxActionsPerCycle: 2, maxFractionPerCycle: 1.0}}
  exclude: {{applicationNames: ["pgwarden*"]}}
  sessions:
    - name: idle-connections
      action: terminate
      states: [idle]
      stateAge: 0s
      applicationNames: ["{app}"]
{extra}"""
    )
    return path


class CliLoop:
    """A `pgwarden enforce` loop whose JSON reports are read on a thread (readline has no deadline)."""

    def __init__(self, dsn: str, policy: Path) -> None:
        self.proc = subprocess.Popen(
            [PGWARDEN, "enforce", "--dsn", dsn, "--policy", str(policy), "--output", "json"],
            env=CODE_UNDER_TEST,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reports: list[dict[str, Any]] = []
        self.logs: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._lines.put), daemon=True),
            # stderr read as it comes too: a full pipe would block the process's logging, and so its cycles.
            threading.Thread(target=self._read, args=(self.proc.stderr, self.logs.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str] | None, put: Callable[[str], None]) -> None:
        assert stream is not None
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                put(line)

    def poll(self) -> list[dict[str, Any]]:
        while not self._lines.empty():
            self.reports.append(json.loads(self._lines.get()))
        return self.reports

    def stop(self) -> str:
        """SIGTERM, wait for the exit (the cycle in progress is finished first); stderr (the logs)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self.poll()
        return "".join(self.logs)


def console_script(name: str, bindir: Path) -> Path:
    """Write the console script `name` that pyproject.toml declares (`[project.scripts]`) into `bindir`, as an
    installer writes one: this interpreter, import the entry point, exit with what it returns.

    The shared venv's editable install belongs to one checkout and may predate the script; this writes the
    script the checkout declares, so a test runs exactly the declared entry point (with CODE_UNDER_TEST)."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name]
    module, _, function = str(declared).partition(":")
    path = bindir / name
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    path.chmod(0o755)
    return path
