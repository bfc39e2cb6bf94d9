"""What the engine knows about a server: the data an observation yields and the decision reads.

Apart from the I/O that fills them (observe.py), so the pure decision (decide.py) and its tests import
nothing that talks to a server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

CLIENT_BACKEND = "client backend"
OWN_APPLICATION_PREFIX = "pgwarden"
"""Sessions of the engine's own login role whose application_name starts with this are pgwarden's own (any
process: another policy's connection, a second replica, a CLI run) and never candidates. The role condition
keeps an application from escaping by naming itself pgwarden. (`pgwarden.engine.connection.APPLICATION_NAME`
starts with it.)"""
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
    superuser: bool = False
    """The session's role is a superuser."""
    permitted: bool = True
    """The engine's role may signal this backend, as PostgreSQL decides it: never a superuser's session unless
    the engine's role is one, another role's only with pg_signal_backend (or the privileges of that role)."""
    blocked: tuple[int, ...] = ()
    """Pids waiting for a lock this session holds (pg_blocking_pids), longest wait first; observed only when a
    rule of the policy has `blocking`."""
    blocked_waits: tuple[float, ...] = ()
    """Seconds each of `blocked` has waited for its lock, in the same order (pg_locks.waitstart)."""
    waiting: bool = False
    """The session itself waits for a lock (wait_event_type Lock): never a root blocker."""

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
    own_roles: tuple[str, ...] = ()
    """The engine connection's `session_user` and `current_user` (see OWN_APPLICATION_PREFIX)."""
    own_superuser: bool = True
    may_read_all_stats: bool = True
    """The engine's role has the privileges of pg_read_all_stats (superusers do)."""
    may_signal_backend: bool = True
    """The engine's role has the privileges of pg_signal_backend (superusers do)."""
    server_time: float | None = None
    """The server's `now()` for the observation, in epoch seconds (to notice a clock step between cycles)."""
    upcoming: tuple[tuple[float, ObservedSession], ...] = ()
    """Sessions a rule will select within the observation gap if they stay as they are, with the seconds after
    `received_at` when they cross, soonest first: a wake-up at that time can signal them without looking first."""
    signal_results: tuple[str, ...] = ()
    """What became of each signal sent in the same statement ("done", "gone", "stateChanged"), in order."""

    @property
    def client_backends(self) -> int:
        return self.backends.get(CLIENT_BACKEND, 0)


ServerCheck = Callable[[], Awaitable[None]]
"""The caller's proof that a new connection reached the server it means (the controller: the pod still has
that address), awaited once per connection before the engine acts on it; it raises to refuse. The engine
cannot know what a right server is; it only makes sure nothing is signalled or written before the check."""
