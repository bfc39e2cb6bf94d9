"""`pgwarden enforce`: apply one PostgresPolicy file to one server, no Kubernetes needed.

Contract (other tools depend on it):
    pgwarden enforce --dsn DSN --policy FILE [--dry-run] [--once] [--output json|text]
Exit codes: 0 success; 2 invalid policy or arguments (nothing touched); 3 server unreachable or a
query failed. In loop mode only the first cycle can end the process with 3: once enforcement has
worked, a lost server is logged and retried with backoff (never slower than the policy's interval)
until SIGINT/SIGTERM, after which the cycle in progress is finished and the exit code is 0.
stdout carries only reports (one JSON object per line per cycle); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import TextIO

import structlog

from pgwarden.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, add_report_options
from pgwarden.engine.connection import EngineDsn, parse_dsn
from pgwarden.engine.errors import CycleInterrupted, EngineError, InvalidDsn
from pgwarden.engine.report import CycleReport, render_text
from pgwarden.engine.scheduler import run_loop
from pgwarden.engine.session import TargetSession
from pgwarden.policy import PolicyDocument, PolicyError, load_policy_document
from pgwarden.settings import Settings, SettingsError

log = structlog.get_logger("pgwarden.cli")

PROG = "pgwarden enforce"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "enforce",
        help="apply a PostgresPolicy file to one PostgreSQL server",
        description=(
            "Evaluate a PostgresPolicy against one PostgreSQL server: report process counts and terminate or "
            "cancel the sessions its rules select. Loops until SIGINT/SIGTERM unless --once is given. "
            "Exit codes: 0 ok, 2 invalid policy or arguments, 3 server unreachable or query failed."
        ),
    )
    parser.add_argument(
        "--dsn",
        required=True,
        help="libpq connection string or postgresql:// URI; libpq variables (PGPASSWORD, PGPASSFILE...) apply",
    )
    parser.add_argument(
        "--policy", required=True, metavar="FILE", help="file holding one PostgresPolicy document ('-': stdin)"
    )
    parser.add_argument("--dry-run", action="store_true", help="only report what would be done (overrides the spec)")
    parser.add_argument("--once", action="store_true", help="run one cycle and exit")
    add_report_options(parser)
    parser.set_defaults(handler=main)


def _fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _read_policy(path: str) -> PolicyDocument:
    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise PolicyError(f"--policy: cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise PolicyError(f"--policy: {path} is not UTF-8 text") from None
    return load_policy_document(text)


class _Printer:
    """Writes reports to stdout, flushing each so a reader sees every cycle at once."""

    def __init__(self, output: str, stream: TextIO) -> None:
        self.output = output
        self.stream = stream
        self.closed = False

    def __call__(self, report: CycleReport) -> None:
        if self.closed:
            return
        text = json.dumps(report.to_json()) if self.output == "json" else render_text(report) + "\n"
        try:
            self.stream.write(text + "\n" if self.output == "json" else text)
            self.stream.flush()
        except BrokenPipeError:
            # The reader went away (`| head -1`): stop printing, keep enforcing, exit quietly later.
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())


async def _enforce(
    dsn: EngineDsn, doc: PolicyDocument, *, dry_run: bool, once: bool, printer: _Printer, settings: Settings
) -> int:
    spec, policy = doc.spec, doc.metadata.name
    session = TargetSession(dsn)
    # From here on SIGINT/SIGTERM never cut a cycle short: they set `stop`, checked between cycles.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if once:
            printer(await session.run(spec, policy=policy, dry_run_override=dry_run))
            return EXIT_OK

        worked = False

        def on_report(report: CycleReport) -> None:
            nonlocal worked
            worked = True
            printer(report)

        def on_error(exc: EngineError, failures: int) -> bool:
            if not worked:
                return False
            log.error("cycle failed; retrying", policy=policy, target=session.target, error=str(exc), failures=failures)
            return True

        await run_loop(
            lambda: session.run(spec, policy=policy, dry_run_override=dry_run),
            interval=spec.observation_gap(),
            stop=stop,
            on_report=on_report,
            on_error=on_error,
            settings=settings,
        )
        log.info("stopped", policy=policy, target=session.target)
        return EXIT_OK
    except EngineError as exc:
        if isinstance(exc, CycleInterrupted):  # --once: what was done before the failure is printed too
            printer(exc.report)
        _fail(str(exc))
        return EXIT_UNREACHABLE
    finally:
        await session.close()


def main(args: argparse.Namespace) -> int:
    """Validate everything before touching the server; then run one cycle or the loop."""
    try:
        doc = _read_policy(args.policy)
    except PolicyError as exc:
        detail = str(exc)
        where = "" if detail.startswith("--policy") else f"invalid policy {args.policy}:\n  "
        _fail(where + detail.replace("\n", "\n  "))
        return EXIT_USAGE
    try:
        dsn = parse_dsn(args.dsn)
        settings = Settings.from_env()
    except (InvalidDsn, SettingsError) as exc:
        _fail(str(exc))
        return EXIT_USAGE
    output = args.output or ("text" if sys.stdout.isatty() else "json")
    dry_run = bool(args.dry_run) or doc.spec.dry_run
    log.info(
        "enforcing",
        policy=doc.metadata.name,
        target=dsn.target,
        dry_run=dry_run,
        once=bool(args.once),
        interval_seconds=doc.spec.interval.total_seconds(),
    )
    return asyncio.run(
        _enforce(
            dsn,
            doc,
            dry_run=bool(args.dry_run),
            once=bool(args.once),
            printer=_Printer(output, sys.stdout),
            settings=settings,
        )
    )
