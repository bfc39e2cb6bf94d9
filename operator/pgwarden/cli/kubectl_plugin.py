"""`kubectl pgwarden`: what pgwarden sees and does, for a person with kubectl (the `kubectl-pgwarden` script).

kubectl runs any executable named `kubectl-NAME` on PATH as `kubectl NAME`, passing the words after NAME
and nothing else (not its own --kubeconfig or --context): so this command takes those flags itself and
reads KUBECONFIG and the current context's namespace as kubectl does.

Exit codes: 0 ok; 1 the API server refused or could not be reached, or the policy does not exist;
2 invalid arguments or policy (or nothing to explain from a status); 3 PostgreSQL unreachable (`--dsn`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from pgwarden import __version__
from pgwarden.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from pgwarden.logs import configure_logging
from pgwarden.policy.api import GROUP, KIND, PLURAL, VERSION

PROG = "kubectl pgwarden"
EXIT_API = 1
"""The API server refused the request, could not be reached, or the policy does not exist."""
DEFAULT_NEXT = 10

Handler = Callable[[argparse.Namespace], int]


class ApiFailure(Exception):
    """A Kubernetes API call failed; the message is for the user (never a token or a kubeconfig's content)."""


# -- arguments -------------------------------------------------------------------------------------------------


def _cluster_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--kubeconfig and --context, taken before or after the subcommand (`kubectl pgwarden --context c status`)."""
    default = None if top else argparse.SUPPRESS  # a subcommand's absent flag must not erase the top-level one
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)"
    )
    parser.add_argument("--context", default=default, help="kubeconfig context (default: the current context)")


def _namespace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's namespace, else default)")


def _output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="table for people, json for scripts"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show what pgwarden sees and does on the PostgreSQL pods its PostgresPolicies select.",
    )
    parser.add_argument("--version", action="version", version=f"kubectl-pgwarden {__version__}")
    _cluster_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_status(commands)
    _add_explain(commands)
    return parser


def _add_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "status",
        help="one row per policy and target, from the policies' status",
        description=(
            "One row per policy and target: mode (enforce or dry run), the Ready condition, backends by "
            "backend_type, client sessions by state, the last acting cycle's actions and how long ago, sessions "
            "skipped by reason, and the target's error. Read from the policies' status alone: no database "
            "access, only get/list on postgrespolicies."
        ),
    )
    _namespace_option(parser)
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="policies of every namespace")
    _output_option(parser)
    _cluster_options(parser, top=False)
    parser.set_defaults(handler=status_main)


def _add_explain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "explain",
        help="which sessions each rule of a policy acts on now, and when the next ones cross",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "For each target: the sessions each rule of POLICY acts on now, and when the next ones cross its\n"
            "thresholds. The output says which of two sources it comes from:\n\n"
            "  status (default): a dry-run policy's status, which records the sessions its last acting cycle\n"
            '    would have signalled on each pod ("now" as of that cycle; no look-ahead). An enforcing\n'
            "    policy's status records what was done, not what would be: use --dsn.\n"
            "  --dsn DSN: the CLI engine (what `pgwarden enforce --dry-run --once` runs) against the server\n"
            "    DSN names, with POLICY's spec read from the cluster: a dry-run cycle (acted on now, or held\n"
            "    back by the blast radius) and a read-only look-ahead (every other session a rule will select,\n"
            "    and when, if it stays as it is). Nothing is signalled or written. The operator's credentials\n"
            "    are not used: DSN carries yours (libpq variables such as PGPASSWORD apply)."
        ),
    )
    parser.add_argument("policy", metavar="POLICY", help="the PostgresPolicy's name")
    _namespace_option(parser)
    parser.add_argument("--dsn", help="explain on this PostgreSQL server with the CLI engine (see above)")
    parser.add_argument(
        "--next",
        type=int,
        default=DEFAULT_NEXT,
        metavar="N",
        help=f"with --dsn: list at most N sessions that cross later (default {DEFAULT_NEXT})",
    )
    _output_option(parser)
    _cluster_options(parser, top=False)
    parser.set_defaults(handler=explain_main)


# -- the API server ----------------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def api_client(args: argparse.Namespace) -> Any:
    """A client for the kubeconfig and context given (or KUBECONFIG / ~/.kube/config and its current context)."""
    from kubernetes import config

    try:
        # persist_config=False: a read-only command never rewrites the user's kubeconfig (refreshed tokens).
        load: Callable[..., Any] = config.new_client_from_config
        return load(config_file=args.kubeconfig, context=args.context, persist_config=False)
    except (config.ConfigException, OSError, ValueError) as exc:
        raise ApiFailure(f"cannot load the kubeconfig: {exc}") from None


def default_namespace(args: argparse.Namespace) -> str:
    """The namespace of the context in use, as kubectl picks it (`default` when the context sets none)."""
    from kubernetes import config

    try:
        contexts, current = config.list_kube_config_contexts(args.kubeconfig)  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError, ValueError):
        return "default"
    chosen = next((c for c in contexts if c.get("name") == args.context), None) if args.context else current
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


def _api_error(exc: Exception) -> ApiFailure:
    """The user's view of a failed call: the status code and the server's message (`... is forbidden: User "u"
    cannot list ...`), never the request's headers."""
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status:
        return ApiFailure(f"the API server answered {status} {reason or ''}".rstrip() + _server_message(exc))
    return ApiFailure(f"cannot reach the API server: {type(exc).__name__}: {exc}")


def _server_message(exc: Exception) -> str:
    """`: MESSAGE` from a Kubernetes Status body, or nothing."""
    try:
        message = json.loads(getattr(exc, "body", None) or "{}").get("message")
    except (ValueError, AttributeError):
        return ""
    return f": {message}" if isinstance(message, str) and message else ""


def _call(function: Callable[[], Any]) -> Any:
    from kubernetes.client.exceptions import OpenApiException
    from urllib3.exceptions import HTTPError

    try:
        return function()
    except (OpenApiException, HTTPError, OSError) as exc:
        raise _api_error(exc) from None


# -- subcommands ------------------------------------------------------------------------------------------------


def status_main(args: argparse.Namespace) -> int:
    from pgwarden.cli import kubectl_status

    try:
        api = api_client(args)
        namespace = None if args.all_namespaces else (args.namespace or default_namespace(args))
        policies = _call(lambda: kubectl_status.list_policies(api, namespace))
    except ApiFailure as exc:
        _fail(str(exc))
        return EXIT_API
    rows = kubectl_status.rows(policies)
    if args.output == "json":
        print(json.dumps({"items": [r.to_json() for r in rows]}, indent=2))
    elif rows:
        print(kubectl_status.render(rows))
    else:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No {KIND} found in {where}.", file=sys.stderr)  # kubectl's wording, on stderr like kubectl
    return EXIT_OK


def explain_main(args: argparse.Namespace) -> int:
    from pgwarden.policy import PolicyError, parse_spec

    try:
        api = api_client(args)
        namespace = args.namespace or default_namespace(args)
        policy = _call(lambda: get_policy_or_missing(api, namespace, args.policy))
    except ApiFailure as exc:
        _fail(str(exc))
        return EXIT_API
    if policy is None:
        _fail(f'{KIND} "{args.policy}" not found in namespace {namespace}')
        return EXIT_API
    try:
        spec = parse_spec(policy.get("spec"))
    except PolicyError as exc:
        _fail(f"{namespace}/{args.policy} has an invalid spec:\n  " + str(exc).replace("\n", "\n  "))
        return EXIT_USAGE
    if args.dsn:
        return _explain_dsn(args, namespace, spec)
    return _explain_status(args, namespace, policy, dry_run=spec.dry_run)


def get_policy_or_missing(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        got = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return cast(dict[str, Any], got)


def _explain_status(args: argparse.Namespace, namespace: str, policy: dict[str, Any], *, dry_run: bool) -> int:
    from pgwarden.cli import kubectl_explain

    if not dry_run:
        _fail(
            f"{namespace}/{args.policy} enforces: its status records what was done, not what would be. "
            "Give --dsn to explain with the CLI engine."
        )
        return EXIT_USAGE
    stale = kubectl_explain.stale_status(policy)
    if stale:
        print(f"{PROG}: warning: {stale}", file=sys.stderr)
    rows = kubectl_explain.from_status(policy)
    _print_explain(args, namespace, kubectl_explain.SOURCE_STATUS, rows)
    return EXIT_OK


def _explain_dsn(args: argparse.Namespace, namespace: str, spec: Any) -> int:
    from pgwarden.cli import kubectl_explain
    from pgwarden.engine.errors import EngineError, InvalidDsn

    try:
        report, rows = kubectl_explain.explain_dsn(args.dsn, spec, args.policy, next_count=args.next)
    except InvalidDsn as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except EngineError as exc:
        _fail(str(exc))
        return EXIT_UNREACHABLE
    for error in report.errors:  # missing grants, refused reads: the list may be incomplete
        print(f"{PROG}: warning: {error}", file=sys.stderr)
    _print_explain(args, namespace, kubectl_explain.SOURCE_DSN, rows, target=report.target)
    return EXIT_OK


def _print_explain(
    args: argparse.Namespace, namespace: str, source: str, rows: Sequence[Any], target: str | None = None
) -> None:
    from pgwarden.cli import kubectl_explain

    if args.output == "json":
        document = {
            "policy": args.policy,
            "namespace": namespace,
            "source": source,
            "sessions": [r.to_json() for r in rows],
        }
        print(json.dumps(document, indent=2))
        return
    origin = f"a dry-run cycle and look-ahead on {target}" if source == kubectl_explain.SOURCE_DSN else "its status"
    print(f"{KIND} {namespace}/{args.policy}, from {origin}:")
    if rows:
        print(kubectl_explain.render(rows, source))
    else:
        print("no session crosses a rule" if source == kubectl_explain.SOURCE_DSN else "no would-be actions recorded")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kubectl-pgwarden` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "next", 0) < 0:
        parser.error("--next: must be 0 or more")
    configure_logging("warning")  # the engine logs on stderr; a person at a terminal wants only problems
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
