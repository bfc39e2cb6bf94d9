"""Find helm at the version the suite pins, building it when absent (the control plane's model).

Order, as tests/harness/controlplane_assets.py: `PGWARDEN_HELM` when it names an executable (taken as
is: the caller chose it), then `helm` from PATH if its version is the pin's major.minor, then the build
cache, running `hack/helm-build.sh` on first use (compiles cmd/helm from its Go module, a few minutes).

Run as a module (`make assets`) to make sure helm exists and print where it is.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness.paths import cache_root

HELM_VERSION = os.environ.get("PGWARDEN_HELM_VERSION", "v3.22.0")
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "helm-build.sh"


def helm_version(path: Path) -> str | None:
    """`v3.22.0` from `helm version --short` ("v3.22.0+g1234567" or "v3.22.0")."""
    try:
        done = subprocess.run(
            [str(path), "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"(v\d+\.\d+\.\d+)", done.stdout.strip()) if done.returncode == 0 else None
    return match.group(1) if match else None


def _same_minor(version: str | None) -> bool:
    """Lint and schema behaviour change between minors; a patch release may stand in for the pin."""
    return version is not None and version.rsplit(".", 1)[0] == HELM_VERSION.rsplit(".", 1)[0]


def from_env() -> Path | None:
    """`$PGWARDEN_HELM`, an explicit choice, used whatever its version."""
    chosen = os.environ.get("PGWARDEN_HELM")
    return Path(chosen) if chosen and os.access(chosen, os.X_OK) else None


def from_path() -> Path | None:
    """`helm` from PATH if its version fits the pin."""
    found = shutil.which("helm")
    if found is None:
        return None
    path = Path(found).resolve()
    return path if _same_minor(helm_version(path)) else None


def cached_binary() -> Path:
    """Where the build script keeps helm for the current pin."""
    return cache_root() / "helm" / HELM_VERSION / "bin" / "helm"


def build() -> Path:
    """Run the build script (a no-op once cached) and return the binary it made."""
    print(
        f"[helm_assets] ensuring helm {HELM_VERSION} under {cache_root() / 'helm'} (a cold build takes minutes)",
        file=sys.stderr,
    )
    env = {**os.environ, "PGWARDEN_CACHE": str(cache_root()), "PGWARDEN_HELM_VERSION": HELM_VERSION}
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1]) / "helm"


@functools.cache
def find_helm() -> tuple[Path, str]:
    """The helm binary and where it came from, resolved once per process."""
    chosen = from_env()
    if chosen is not None:
        return chosen, "PGWARDEN_HELM"
    found = from_path()
    if found is not None:
        return found, "PATH"
    cached = cached_binary()
    path = cached if os.access(cached, os.X_OK) else build()
    return path, f"built from its Go module, cached in {path.parent}"


def main() -> None:
    path, origin = find_helm()
    print(f"{'helm':15} {path}  ({origin})")


if __name__ == "__main__":
    main()
