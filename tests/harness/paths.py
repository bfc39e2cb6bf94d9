"""Where the harness caches what it fetches or builds: outside the checkout, shared by runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """World-traversable cache root: PostgreSQL runs as the unprivileged `postgres` user and must reach it.

    `~/.cache` is under `/root` (mode 700) on these machines, hence `/var/tmp`.
    """
    root = Path(os.environ.get("PGWARDEN_CACHE", "/var/tmp/pgwarden-cache"))  # noqa: S108 - shared on purpose
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    return root
