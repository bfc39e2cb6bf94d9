"""Logging: JSON lines on a non-terminal, stdlib loggers through the same renderer, secrets masked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from pgwarden.logs import configure_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "pgwarden"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_when_not_a_terminal_and_stdlib_goes_the_same_way() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    structlog.get_logger("pgwarden.engine").info("session terminated", pid=42, policy="p", dry_run=False)
    logging.getLogger("kopf.objects").warning("from the standard library %s", "too")
    structlog.get_logger("pgwarden.engine").debug("not shown at info")
    first, second = _lines(stream)
    assert first["event"] == "session terminated"
    assert first["pid"] == 42
    assert first["level"] == "info"
    assert first["logger"] == "pgwarden.engine"
    assert "timestamp" in first
    assert second["event"] == "from the standard library too"
    assert second["logger"] == "kopf.objects"
    assert second["level"] == "warning"


def test_console_format_on_a_terminal() -> None:
    stream = _Tty()
    configure_logging("debug", stream=stream)
    structlog.get_logger("x").debug("hello", pid=7)
    out = stream.getvalue()
    assert "hello" in out
    assert "pid=7" in out
    assert not out.startswith("{")


def test_configuring_twice_does_not_duplicate_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", stream=first)
    configure_logging("info", stream=second)
    structlog.get_logger("x").info("once")
    assert first.getvalue() == ""
    assert len(_lines(second)) == 1


def test_secrets_are_masked_whoever_logs_them() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    structlog.get_logger("x").info("connecting", dsn="host=a password=hunter22", password="hunter22", token="t")
    structlog.get_logger("x").info("failed: password=hunter22 host=a and postgresql://u:hunter22@h/db")
    logging.getLogger("psycopg").warning("conninfo password=hunter22")
    text = stream.getvalue()
    assert "hunter22" not in text
    first = _lines(stream)[0]
    assert first["dsn"] == "***"
    assert first["password"] == "***"
    assert first["token"] == "***"
