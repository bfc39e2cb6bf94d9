"""`pgwarden run`: the central controller, enforcing PostgresPolicy objects on the pods they select.

pgwarden run [--namespace NS]... [--all-namespaces] [--standalone] [--no-policy-reports] [--metrics-port 9090]
             [--health-port 8080]

Exit codes: 0 after SIGINT/SIGTERM; 2 a configuration error found at start-up, nothing started (invalid
arguments or settings, no kubeconfig, or no peering object without --standalone: the message names the CRD
and the object); 3 the Kubernetes API could not be used at start-up.
"""

from __future__ import annotations

import argparse
import sys

from pgwarden.cli import EXIT_UNREACHABLE, EXIT_USAGE, add_common_options, load_settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the Kubernetes controller (kopf) that enforces PostgresPolicy objects",
        description=(
            "Watch PostgresPolicy objects and enforce each on the running pods its selector matches, "
            "connecting to podIP:spec.connection.port with the credentials Secret the policy names. "
            "Without --namespace, watches all namespaces."
        ),
    )
    parser.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable)",
    )
    parser.add_argument("--all-namespaces", action="store_true", help="watch every namespace (the default)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (default 9090)")
    parser.add_argument("--health-port", type=int, default=8080, help="liveness /healthz port (default 8080)")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="run without peering (one replica only). Without it, the peering object `pgwarden` "
        "(ClusterKopfPeering, or a KopfPeering per --namespace) must exist or be creatable, else run exits 2",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="evaluations run at once over all policies and targets (default 32, or $PGWARDEN_CONCURRENCY)",
    )
    parser.add_argument(
        "--no-policy-reports",
        action="store_true",
        help="never write openreports.io Reports, even when their CRDs are installed (or $PGWARDEN_POLICY_REPORTS=0)",
    )
    add_common_options(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    if args.all_namespaces and args.namespaces:
        print("pgwarden run: --all-namespaces and --namespace are mutually exclusive", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(
        "pgwarden run", concurrency=args.concurrency, policy_reports=0 if args.no_policy_reports else None
    )
    if settings is None:
        return EXIT_USAGE
    # kopf and kubernetes load only for this command
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException
    from urllib3.exceptions import HTTPError

    from pgwarden.controller.app import PeeringUnavailable, run_controller

    try:
        return run_controller(
            namespaces=args.namespaces,
            all_namespaces=args.all_namespaces,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            standalone=args.standalone,
            settings=settings,
        )
    except (PeeringUnavailable, ConfigException) as exc:  # configuration: nothing was started or touched
        print(f"pgwarden run: refusing to start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ApiException, HTTPError) as exc:  # the API server refused or could not be reached at start-up
        reason = f"HTTP {exc.status} {exc.reason}" if isinstance(exc, ApiException) else type(exc).__name__
        print(f"pgwarden run: the Kubernetes API could not be used at start-up ({reason})", file=sys.stderr)
        return EXIT_UNREACHABLE
