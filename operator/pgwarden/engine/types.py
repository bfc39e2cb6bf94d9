"""What the engine knows about a server: the data an observation yields and the decision reads.

Apart from the I/O that fills them (observe.py), so the pure decision (decide.py) and its tests import
nothing that talks to a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

CLIENT_BACKEND = "client backend"
UNKNOWN = "unknown"
"""Reported for a NULL `backend_type` or `state`: a role without pg_read_all_stats sees other roles' sessions
with almost every column NULL, so they are counted under `backends["unknown"]` and never acted on."""

_AGE_ATTRIBUTES = {
    "state_change": "state_age",
    "query_start": "query_age",
    "xact_start": "transaction_age",
    "backend_start": "connection_age",
}


@dataclass(frozen=True)
class ObservedSession:
    """A client backend as the observation saw it; `backend_start`/`state_change` identify it for acting."""

    pid: int
    user: str | None
    database: str | None
    application_name: str | None
    client_address: str | None
    state: str | None
    backend_start: datetime
    state_change: datetime | None
    state_age: float | None
    query_age: float | None
    transaction_age: float | None
    connection_age: float | None
    backend_type: str = CLIENT_BACKEND

    def age(self, column: str) -> float | None:
        """The age measured from a pg_stat_activity timestamp column (see SessionRule.ages)."""
        value: float | None = getattr(self, _AGE_ATTRIBUTES[column])
        return value


@dataclass(frozen=True)
class Observation:
    """Everything a cycle knows about the server, read in one statement."""

    server_version: str
    own_pid: int
    backends: dict[str, int]
    client_states: dict[str, int]
    sessions: tuple[ObservedSession, ...]
    next_crossing: float | None
    """Seconds after `received_at` when the next session seen now crosses a rule's thresholds."""
    received_at: float = 0.0
    """`time.monotonic()` when the result arrived; the server's `now()` was at most this, so a deadline
    measured from here is never early."""

    @property
    def client_backends(self) -> int:
        return self.backends.get(CLIENT_BACKEND, 0)
