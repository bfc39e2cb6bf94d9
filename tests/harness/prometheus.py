"""Find (building on first use) promtool and prometheus at the pinned version, and run a throwaway Prometheus.

The alert rules and the Grafana dashboard are tested with the real tools. As for the control plane
(`tests/harness/controlplane_assets.py`), nothing prebuilt can be downloaded here, so the fallback is
`hack/prometheus-build.sh`, which compiles both from the Prometheus Go module once and caches them under
`cache_root()`. Order: `$PGWARDEN_PROMETHEUS_BIN` when it holds both, then each from PATH if its version
is the pinned release's, then the build cache (building on first use).

Run as a module (`make assets`) to make sure the binaries exist and print where they are.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.harness.paths import cache_root
from tests.harness.postgres import free_port, wait_for

MODULE_VERSION = os.environ.get("PGWARDEN_PROMETHEUS_VERSION", "v0.316.0")
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "prometheus-build.sh"
NAMES = ("prometheus", "promtool")


def release(module_version: str = MODULE_VERSION) -> str:
    """`3.16.0` for the Go module version `v0.316.0` (Prometheus tags its module v0.<major><minor>.<patch>)."""
    match = re.fullmatch(r"v0\.(\d)(\d+)\.(\d+)", module_version)
    if match is None:
        raise ValueError(f"not a Prometheus module version: {module_version!r}")
    return f"{match.group(1)}.{int(match.group(2))}.{match.group(3)}"


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of prometheus and promtool, and where they came from."""

    prometheus: Path
    promtool: Path
    origin: str

    def describe(self) -> str:
        return f"prometheus {self.prometheus}\npromtool   {self.promtool}\n({self.origin})"


def version_of(path: Path) -> str | None:
    """`3.16.0` from `prometheus --version` / `promtool --version` ("prometheus, version 3.16.0 (...)")."""
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version (\S+)", done.stdout + done.stderr)
    return match.group(1) if match else None


def cached_dir() -> Path:
    """Where the build script keeps the binaries for the current pin."""
    return cache_root() / "prometheus" / MODULE_VERSION / "bin"


def _complete(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in NAMES)


def build_dir() -> Path:
    """Run the build script (a no-op once cached) and return the directory it prints."""
    print(
        f"[prometheus] ensuring prometheus and promtool {release()} under {cache_root() / 'prometheus'} "
        "(a cold build takes several minutes)",
        file=sys.stderr,
    )
    env = {**os.environ, "PGWARDEN_CACHE": str(cache_root()), "PGWARDEN_PROMETHEUS_VERSION": MODULE_VERSION}
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


@functools.cache
def find_binaries() -> Binaries:
    """Resolve both binaries once per process (see the module docstring for the order)."""
    override = os.environ.get("PGWARDEN_PROMETHEUS_BIN")
    if override and _complete(Path(override)):
        return Binaries(Path(override) / "prometheus", Path(override) / "promtool", "PGWARDEN_PROMETHEUS_BIN")
    on_path = {name: shutil.which(name) for name in NAMES}
    if all(p and version_of(Path(p)) == release() for p in on_path.values()):
        return Binaries(Path(str(on_path["prometheus"])), Path(str(on_path["promtool"])), "PATH")
    directory = cached_dir() if _complete(cached_dir()) else build_dir()
    origin = f"built from the Go module {MODULE_VERSION}, cached in {directory}"
    return Binaries(directory / "prometheus", directory / "promtool", origin)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; the caller checks the exit code (and shows the output when it is not 0)."""
    cmd = [str(find_binaries().promtool), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


class PrometheusServer:
    """A Prometheus scraping `targets` every `scrape_interval`, on a free port of 127.0.0.1, data in `workdir`.

    Only the HTTP API is used: the build embeds no web UI.
    """

    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": "pgwarden", "static_configs": [{"targets": targets}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        cmd = [
            str(find_binaries().prometheus),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, timeout=60, interval=0.2, message=f"Prometheus ready on {self.url}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """`data` of a GET on the HTTP API; a query Prometheus refuses (HTTP 400) raises with its error."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Prometheus refused {params}: {exc.read().decode(errors='replace')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one result) `expr` gives now."""
        data = self.api("query", query=expr)
        return list(data["result"]) if data["resultType"] in ("vector", "matrix") else [data]

    def series_names(self) -> set[str]:
        """Every metric name Prometheus holds."""
        return set(self.api("label/__name__/values"))

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def main() -> None:
    print(find_binaries().describe())


if __name__ == "__main__":
    main()
