"""Typed failures of the engine, so callers map them to exit codes and status without parsing messages.

Messages are safe to show anywhere (terminal, logs, a policy's status): they never contain a password
or the DSN they came from.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class InvalidDsn(EngineError):
    """The connection string cannot be parsed; a usage error, not a server problem."""


class TargetUnreachable(EngineError):
    """The server could not be reached, refused us, or the connection broke."""


class QueryFailed(EngineError):
    """The server was reached but a statement the engine needs failed."""
