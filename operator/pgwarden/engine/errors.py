"""Typed failures of the engine, so callers map them to exit codes and status without parsing messages.

Messages are safe to show anywhere (terminal, logs, a policy's status): they never contain a password
or the DSN they came from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgwarden.engine.report import CycleReport


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class InvalidDsn(EngineError):
    """The connection string cannot be parsed; a usage error, not a server problem."""


class TargetUnreachable(EngineError):
    """The server could not be reached, refused us, or the connection broke."""


class TargetNotConfirmed(EngineError):
    """The caller's check of a new connection's server failed (see `ServerCheck`): nothing was done there."""


class AuthenticationFailed(TargetUnreachable):
    """The server refused the login (password or user name): credentials held in a cache are stale, perhaps
    rotated in PostgreSQL before the Secret; the caller reads them again before the next attempt."""


class QueryFailed(EngineError):
    """The server was reached but a statement the engine needs failed."""


class CycleInterrupted(TargetUnreachable):
    """The connection broke after the cycle had begun to act: the partial report travels with the error.

    Every signal PostgreSQL accepted before the break is in `report.actions`, so callers that report
    (CLI JSON, status, Events, metrics) still can; callers that only handle failures treat it as the
    TargetUnreachable it is (close the connection, back off).
    """

    def __init__(self, message: str, report: CycleReport) -> None:
        super().__init__(message)
        self.report = report
