"""pgwarden: enforce process policies on PostgreSQL from Kubernetes, a sidecar, or the command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pgwarden")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
