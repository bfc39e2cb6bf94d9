"""`pgwarden drain`: terminate every client session connected to one database, until none is left.

Contract (other tools depend on it):
    pgwarden drain --dsn DSN --database NAME [--timeout 60s] [--exclude-user PATTERN]... [--dry-run]
                   [--output json|text]
Exit codes: 0 drained (no session drain may terminate remains; the ones it must not touch are listed
under `untouched`), also after --dry-run; 2 invalid arguments (DSN, duration, --database missing or not a
database on the server: nothing touched); 3 server unreachable or a query failed; 4 the timeout passed
with sessions left (listed under `survivors`). stdout carries only the report; logs go to stderr.
The same protections and guarded signals as `enforce` (see `pgwarden.engine.drain`); the blast-radius
limits are ignored on purpose, which the report says in `notes`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import structlog

from pgwarden.cli import EXIT_OK, EXIT_TIMEOUT, EXIT_UNREACHABLE, EXIT_USAGE, add_report_options
from pgwarden.engine.connection import EngineDsn, connect, parse_dsn, target_of
from pgwarden.engine.drain import (
    BLAST_RADIUS_NOTE,
    QUIET_SECONDS,
    DrainInterrupted,
    DrainReport,
    UnknownDatabase,
    drain,
)
from pgwarden.engine.errors import EngineError, InvalidDsn
from pgwarden.engine.report import ActionRecord
from pgwarden.policy import parse_duration

log = structlog.get_logger("pgwarden.cli")

PROG = "pgwarden drain"
DEFAULT_TIMEOUT = "60s"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "drain",
        help="terminate every client session connected to one database",
        description=(
            "Terminate every client session connected to DATABASE, in rounds, until none remains or the timeout "
            "passes: clients that reconnect are terminated again. After terminating, the database counts as "
            f"drained once it stayed free of such sessions for {QUIET_SECONDS:g} s "
            f"(so a run ends at most {QUIET_SECONDS:g} s after --timeout). "
            "Never touched: pgwarden's own sessions, "
            "non-client backends (replication connections, autovacuum, background workers), sessions the role "
            "may not signal, and --exclude-user users; they are listed apart and do not hold the drain up. "
            "Each signal is guarded (pid, backend_start, state_change) as in `pgwarden enforce`. "
            "The blast-radius limits (maxActionsPerCycle, maxFractionPerCycle) are ignored on purpose. "
            "Exit codes: 0 drained (or --dry-run), 2 invalid arguments or unknown database (nothing touched), "
            "3 server unreachable or query failed, 4 timeout with sessions left (listed as survivors)."
        ),
    )
    parser.add_argument(
        "--dsn",
        required=True,
        help="libpq connection string or postgresql:// URI; libpq variables (PGPASSWORD, PGPASSFILE...) apply",
    )
    parser.add_argument("--database", required=True, metavar="NAME", help="the database to drain (its exact name)")
    parser.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        metavar="DURATION",
        help=f"stop repeating after this long, e.g. 30s, 2m (default: {DEFAULT_TIMEOUT}); one round always runs",
    )
    parser.add_argument(
        "--exclude-user",
        action="append",
        default=[],
        metavar="PATTERN",
        help="never terminate this user's sessions (fnmatch glob, as exclude.users in a policy); repeatable",
    )
    parser.add_argument("--dry-run", action="store_true", help="terminate nothing; list what would be terminated")
    add_report_options(parser)
    parser.set_defaults(handler=main)


def _fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["    " + fmt.format(*row).rstrip() for row in [headers, *rows]]


def _action_row(a: ActionRecord) -> list[str]:
    state = a.state or "-"
    return [str(a.pid), a.user or "-", a.application_name or "-", a.client_address or "local", state, _yes(a.done)]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render_text(report: DrainReport) -> str:
    """The same content as the JSON, for a person at a terminal."""
    doc = report.to_json()
    if report.dry_run:
        outcome = "dry run"
    elif report.drained:
        outcome = f"drained in {report.rounds} round(s)"
    else:
        outcome = f"timed out after {report.timeout_seconds:g}s with {len(report.survivors)} session(s) left"
    lines = [f"drain {report.database}  target {report.target}  PostgreSQL {report.server_version}  {outcome}"]
    lines.append(f"  note: {BLAST_RADIUS_NOTE}")
    verb = "would terminate" if report.dry_run else "terminated"
    lines.append(f"  {verb} ({len(report.actions)}):")
    if report.actions:
        rows = [_action_row(a) for a in report.actions]
        lines.extend(_table(["PID", "USER", "APPLICATION", "CLIENT", "STATE", "DONE"], rows))
    for key, extra in (("survivors", "signalled"), ("untouched", "reason")):
        entries: list[dict[str, Any]] = doc[key]
        if not entries:
            continue
        lines.append(f"  {key} ({len(entries)}):")
        rows = [
            [
                str(e["pid"]),
                e["user"] or "-",
                e["applicationName"] or "-",
                e["backendType"] or "-",
                e["state"] or "-",
                _yes(e[extra]) if isinstance(e[extra], bool) else str(e[extra]),
            ]
            for e in entries
        ]
        lines.extend(_table(["PID", "USER", "APPLICATION", "BACKEND TYPE", "STATE", extra.upper()], rows))
    if report.skipped:
        lines.append(f"  skipped ({len(report.skipped)}):")
        lines.extend(_table(["PID", "REASON"], [[str(s.pid), s.reason] for s in report.skipped]))
    lines.extend(f"  error: {error}" for error in report.errors)
    return "\n".join(lines) + "\n"


def _print(report: DrainReport, output: str) -> None:
    text = json.dumps(report.to_json()) + "\n" if output == "json" else render_text(report)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away: the drain is done, nothing more to say
        pass


def _redacted(report: DrainReport, dsn: EngineDsn) -> DrainReport:
    report.errors[:] = [dsn.redact(e) for e in report.errors]
    return report


async def _drain(dsn: EngineDsn, args: argparse.Namespace, within: float, output: str) -> int:
    try:
        conn = await connect(dsn)
    except EngineError as exc:
        _fail(dsn.redact(str(exc)))
        return EXIT_UNREACHABLE
    target = target_of(conn)
    bound = log.bind(command="drain", database=args.database, target=target)
    try:
        report = await drain(
            conn,
            args.database,
            target=target,
            log=bound,
            within=within,
            exclude_users=tuple(args.exclude_user),
            dry_run=bool(args.dry_run),
        )
    except UnknownDatabase as exc:
        _fail(dsn.redact(str(exc)))
        return EXIT_USAGE
    except EngineError as exc:
        if isinstance(exc, DrainInterrupted):  # what was terminated before the failure is printed too
            _print(_redacted(exc.report, dsn), output)
        _fail(dsn.redact(str(exc)))
        return EXIT_UNREACHABLE
    finally:
        await conn.close()
    _print(_redacted(report, dsn), output)
    bound.info(
        "drain finished",
        drained=report.drained,
        dry_run=report.dry_run,
        rounds=report.rounds,
        terminated=len(report.actions),
        survivors=len(report.survivors),
        untouched=len(report.untouched),
        duration_seconds=round(report.duration_seconds, 3),
    )
    return EXIT_OK if report.dry_run or report.drained else EXIT_TIMEOUT


def main(args: argparse.Namespace) -> int:
    """Validate every argument before touching the server; then drain."""
    if not args.database:
        _fail("--database: must name a database")
        return EXIT_USAGE
    try:
        timeout = parse_duration(args.timeout).total_seconds()
    except ValueError as exc:
        _fail(f"--timeout: {exc}")
        return EXIT_USAGE
    if any(not user for user in args.exclude_user):
        _fail("--exclude-user: must not be empty")
        return EXIT_USAGE
    try:
        dsn = parse_dsn(args.dsn)
    except InvalidDsn as exc:
        _fail(str(exc))
        return EXIT_USAGE
    output = args.output or ("text" if sys.stdout.isatty() else "json")
    log.info("draining", database=args.database, target=dsn.target, dry_run=bool(args.dry_run), timeout=timeout)
    return asyncio.run(_drain(dsn, args, timeout, output))
