"""Logging for every pgwarden process: structlog, to stderr, JSON lines unless a person is watching.

stdout belongs to reports (`pgwarden enforce` prints one JSON object per cycle there), so logs always
go to stderr. Libraries that log through the standard library (kopf, psycopg, asyncio) are routed
through the same processors, so one process writes one format. A last processor masks anything that
looks like a password, whoever logged it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

_SENSITIVE_KEYS = frozenset({"password", "passwd", "secret", "token", "dsn", "conninfo", "authorization"})
_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def _mask(text: str) -> str:
    return _KV_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1***@", text))


def redact_secrets(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """Mask values under secret-sounding keys and password-looking fragments in any string value."""
    for key, value in list(event_dict.items()):
        if key.lower() in _SENSITIVE_KEYS and value is not None:
            event_dict[key] = "***"
        elif isinstance(value, str) and ("password" in value.lower() or "://" in value):
            event_dict[key] = _mask(value)
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        redact_secrets,
    ]


def configure_logging(level: str | int = "INFO", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger; JSON when `stream` is not a terminal (or if `json`).

    Safe to call more than once (tests, the CLI after parsing `--log-level`): handlers are replaced.
    """
    stream = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: Processor = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    numeric = level if isinstance(level, int) else logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # first, so a filtered-out event costs next to nothing
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json else _keep_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("pgwarden")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "pgwarden"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)


def _keep_exc_info(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The console renderer formats exceptions itself (nicely); leave exc_info for it."""
    return event_dict
