"""Running the `pgwarden` command as a user would: the console script, this checkout's code, a policy file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PGWARDEN = str(Path(sys.executable).parent / "pgwarden")
CODE_UNDER_TEST = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "operator")}
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
