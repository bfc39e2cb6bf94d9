"""Find etcd, kube-apiserver and kubectl at the versions the suite pins, building them when absent.

No binary download is possible on our machines, so the fallback is `hack/controlplane-build.sh`,
which compiles the three from their Go modules once and caches them under `cache_root()`.
Order, as in controller-runtime's envtest: `KUBEBUILDER_ASSETS` when it holds all three, then each
binary from PATH if its version fits the pins, then the build cache (building on first use).
A kubectl outside the +/-1 minor skew of the server is never used: Debian's /usr/bin/kubectl here is a
dispatcher over kubectl 1.27-1.33 and would talk to a 1.37 server out of policy.

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
from dataclasses import dataclass
from pathlib import Path

from tests.harness.paths import cache_root

K8S_VERSION = os.environ.get("PGWARDEN_K8S_VERSION", "v1.37.2")
ETCD_VERSION = os.environ.get("PGWARDEN_ETCD_VERSION", "v3.6.16")
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "controlplane-build.sh"
NAMES = ("etcd", "kube-apiserver", "kubectl")


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the three control-plane executables, and where each came from."""

    etcd: Path
    kube_apiserver: Path
    kubectl: Path
    origin: dict[str, str]

    def describe(self) -> str:
        """One line per binary: name, path, origin."""
        paths = {"etcd": self.etcd, "kube-apiserver": self.kube_apiserver, "kubectl": self.kubectl}
        return "\n".join(f"{name:15} {paths[name]}  ({self.origin[name]})" for name in NAMES)


def _minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version such as `v1.37.2`, `1.32+` or `3.6.16`."""
    match = re.match(r"v?(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def _output(*cmd: str) -> str:
    """stdout of a version query, or "" when the program fails or hangs."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def etcd_version(path: Path) -> str | None:
    """`3.6.16` from `etcd --version` ("etcd Version: 3.6.16")."""
    match = re.search(r"etcd Version:\s*(\S+)", _output(str(path), "--version"))
    return match.group(1) if match else None


def apiserver_version(path: Path) -> str | None:
    """`v1.37.2` from `kube-apiserver --version` ("Kubernetes v1.37.2")."""
    match = re.search(r"Kubernetes\s+(v\S+)", _output(str(path), "--version"))
    return match.group(1) if match else None


def kubectl_version(path: Path) -> str | None:
    """The client gitVersion `kubectl version --client -o json` reports."""
    try:
        data = json.loads(_output(str(path), "version", "--client", "-o", "json") or "{}")
    except json.JSONDecodeError:
        return None
    version = data.get("clientVersion", {}).get("gitVersion")
    return str(version) if version else None


def _fits(name: str, version: str | None) -> bool:
    """Whether a binary of this version may stand in for the pinned one."""
    if version is None:
        return False
    if name == "kube-apiserver":
        return version == K8S_VERSION  # the e2e suite asserts the exact server version
    if name == "etcd":
        return _minor(version) == _minor(ETCD_VERSION)
    (major, minor), (pin_major, pin_minor) = _minor(version), _minor(K8S_VERSION)
    return major == pin_major and abs(minor - pin_minor) <= 1  # kubectl's version skew policy


VERSION_OF = {"etcd": etcd_version, "kube-apiserver": apiserver_version, "kubectl": kubectl_version}


def from_kubebuilder_assets() -> dict[str, Path] | None:
    """All three from `$KUBEBUILDER_ASSETS`, or None unless every one is there."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        return None
    found = {name: Path(assets) / name for name in NAMES}
    return found if all(os.access(p, os.X_OK) for p in found.values()) else None


def from_path(name: str) -> Path | None:
    """`name` from PATH if its version fits the pins."""
    found = shutil.which(name)
    if found is None:
        return None
    path = Path(found).resolve()
    return path if _fits(name, VERSION_OF[name](path)) else None


def build_dir() -> Path:
    """Run the build script (a no-op once cached) and return the directory it prints."""
    print(
        f"[controlplane_assets] ensuring kube-apiserver {K8S_VERSION}, etcd {ETCD_VERSION}, kubectl "
        f"{K8S_VERSION} under {cache_root() / 'controlplane'} (a cold build takes several minutes)",
        file=sys.stderr,
    )
    env = {
        **os.environ,
        "PGWARDEN_CACHE": str(cache_root()),
        "PGWARDEN_K8S_VERSION": K8S_VERSION,
        "PGWARDEN_ETCD_VERSION": ETCD_VERSION,
    }
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env=env, stdout=subprocess.PIPE, text=True, check=True
    )  # its progress goes to our stderr as it happens
    return Path(done.stdout.strip().splitlines()[-1])


def cached_dir() -> Path:
    """Where the build script keeps binaries for the current pins."""
    return cache_root() / "controlplane" / f"k8s-{K8S_VERSION}-etcd-{ETCD_VERSION}" / "bin"


@functools.cache
def find_binaries() -> Binaries:
    """Resolve the three binaries once per process (see the module docstring for the order)."""
    assets = from_kubebuilder_assets()
    if assets is not None:
        return _binaries(assets, dict.fromkeys(NAMES, "KUBEBUILDER_ASSETS"))
    found: dict[str, Path] = {}
    origin: dict[str, str] = {}
    for name in NAMES:
        path = from_path(name)
        if path is not None:
            found[name], origin[name] = path, "PATH"
    missing = [name for name in NAMES if name not in found]
    if missing:
        cached = cached_dir()
        bindir = cached if all(os.access(cached / n, os.X_OK) for n in NAMES) else build_dir()
        for name in missing:
            found[name], origin[name] = bindir / name, f"built from Go modules, cached in {bindir}"
    return _binaries(found, origin)


def _binaries(paths: dict[str, Path], origin: dict[str, str]) -> Binaries:
    return Binaries(etcd=paths["etcd"], kube_apiserver=paths["kube-apiserver"], kubectl=paths["kubectl"], origin=origin)


def main() -> None:
    print(find_binaries().describe())


if __name__ == "__main__":
    main()
