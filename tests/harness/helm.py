"""Run the pinned helm on manifests/helm/pgwarden and read what it renders (this module holds no tests).

helm keeps a cache, config and data directory under $HOME by default; each run here gets them under a
temporary directory of its own, so tests neither read a developer's repositories and plugins nor leave
anything behind.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.harness.helm_assets import find_helm
from tests.harness.manifests import MANIFESTS, SYSTEM_NAMESPACE

CHART = MANIFESTS / "helm" / "pgwarden"
RELEASE = "pgwarden"
Key = tuple[str, str, str]  # (kind, name, namespace or "" when cluster-scoped)


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with private state directories (and `kubeconfig` for commands that talk to a server)."""
    path, _ = find_helm()
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
        }
        env.pop("KUBECONFIG", None)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        done = subprocess.run([str(path), *args], capture_output=True, text=True, env=env, timeout=120, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def values_file(values: dict[str, Any], directory: Path) -> Path:
    """`values` as a file for `-f`, the way users pass theirs."""
    path = directory / "values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def template(*extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart as release `pgwarden` in pgwarden-system, as the README installs it."""
    return helm("template", RELEASE, str(CHART), "--namespace", SYSTEM_NAMESPACE, *extra, check=check)


def render(*extra: str) -> list[dict[str, Any]]:
    """The documents `helm template` renders (with `extra` options, e.g. `-f values.yaml`)."""
    return [doc for doc in yaml.safe_load_all(template(*extra).stdout) if doc]


def key(doc: dict[str, Any]) -> Key:
    meta = doc["metadata"]
    return (str(doc["kind"]), str(meta["name"]), str(meta.get("namespace", "")))


def by_key(docs: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Documents by (kind, name, namespace); a duplicate key is an error, not a silent overwrite."""
    out: dict[Key, dict[str, Any]] = {}
    for doc in docs:
        assert key(doc) not in out, f"rendered twice: {key(doc)}"
        out[key(doc)] = doc
    return out
