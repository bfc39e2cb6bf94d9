"""`pgwarden sidecar`: enforce, from inside a PostgreSQL pod, the policies that select that pod.

pgwarden sidecar [--pod-name $POD_NAME] [--namespace $POD_NAMESPACE] [--dsn DSN]
                 [--metrics-port 9090] [--health-port 8080]
"""

from __future__ import annotations

import argparse
import os
import sys

from pgwarden.cli import EXIT_USAGE, add_common_options, load_settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="enforce policies on this pod's own PostgreSQL (run inside the PostgreSQL pod)",
        description=(
            "Enforce the PostgresPolicy objects whose selector matches this pod, on this pod's own server, "
            "when the pod is annotated pgwarden.dev/enforcer=sidecar. Credentials come from --dsn or the "
            "libpq environment (PGHOST, PGUSER, PGPASSWORD, ...), never from a Secret."
        ),
    )
    parser.add_argument("--pod-name", default=os.environ.get("POD_NAME"), help="this pod (default: $POD_NAME)")
    parser.add_argument(
        "--namespace", default=os.environ.get("POD_NAMESPACE"), help="its namespace (default: $POD_NAMESPACE)"
    )
    parser.add_argument(
        "--dsn", default="", help="libpq connection string (default: empty, i.e. the libpq environment variables)"
    )
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (default 9090)")
    parser.add_argument("--health-port", type=int, default=8080, help="liveness /healthz port (default 8080)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="evaluations run at once on this server (default 4, or $PGWARDEN_SIDECAR_CONCURRENCY)",
    )
    add_common_options(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    if not args.pod_name or not args.namespace:
        print(
            "pgwarden sidecar: --pod-name and --namespace (or POD_NAME and POD_NAMESPACE) are required", file=sys.stderr
        )
        return EXIT_USAGE
    settings = load_settings("pgwarden sidecar", sidecar_concurrency=args.concurrency)
    if settings is None:
        return EXIT_USAGE
    from pgwarden.sidecar.app import run_sidecar  # kubernetes loads only for this command

    return run_sidecar(args.pod_name, args.namespace, args.dsn, args.metrics_port, args.health_port, settings)
