"""The `pgwarden` command: a thin argparse front over the engine and, later, the operator and sidecar.

Subcommands live in their own modules, listed in `SUBCOMMANDS`; each exposes `register(subparsers)`,
which adds its parser and sets `handler` (a function taking the parsed arguments and returning the exit
code). Modules must keep heavy imports (kopf, kubernetes) inside their handler, so `pgwarden --help`
and `pgwarden enforce` stay quick and never load the operator.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pgwarden import __version__
from pgwarden.logs import configure_logging
from pgwarden.settings import Settings, SettingsError

EXIT_OK = 0
EXIT_USAGE = 2
"""Invalid arguments or policy (argparse uses 2 as well); nothing was touched."""
EXIT_UNREACHABLE = 3
"""The server could not be reached or queried."""
EXIT_TIMEOUT = 4
"""`pgwarden drain`: the timeout passed with sessions left that drain may terminate."""

SUBCOMMANDS: tuple[str, ...] = (
    "pgwarden.cli.enforce",
    "pgwarden.cli.drain",
    "pgwarden.cli.run",
    "pgwarden.cli.sidecar",
)
"""Modules providing subcommands, in `--help` order."""

LOG_LEVELS = ("debug", "info", "warning", "error")
Handler = Callable[[argparse.Namespace], int]


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand takes (after the subcommand name, where users type them)."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get("PGWARDEN_LOG_LEVEL", "info").lower(),
        help="log verbosity on stderr (default: info, or $PGWARDEN_LOG_LEVEL)",
    )


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """The report format of the commands that print what they did (`enforce`, `drain`), and the common ones."""
    parser.add_argument(
        "--output",
        choices=("json", "text"),
        default=None,
        help="report format on stdout (default: json when stdout is not a terminal, else text)",
    )
    add_common_options(parser)


def load_settings(prog: str, **flags: Any) -> Settings | None:
    """The settings from $PGWARDEN_* and the flags given (None ones are not given); None after printing why
    they are unusable."""
    try:
        return Settings.from_env().replace(**flags)
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgwarden",
        description="Enforce process policies (session rules, connection limits) on PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"pgwarden {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pgwarden` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = str(getattr(args, "log_level", "info"))
    if level not in LOG_LEVELS:  # a bad $PGWARDEN_LOG_LEVEL is not checked by argparse
        parser.error(f"--log-level: must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    configure_logging(level)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:  # --once or start-up interrupted; the loop handles SIGINT itself
        print("pgwarden: interrupted", file=sys.stderr)
        return 130


__all__ = [
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "SUBCOMMANDS",
    "add_common_options",
    "add_report_options",
    "build_parser",
    "load_settings",
    "main",
]
