"""Wake-ups for known crossings: what the last observation said would be due now, and who was just signalled.

An observation returns, besides the sessions a rule selects now, those it will select within the observation
gap if they stay as they are (`Observation.upcoming`, with their crossing times). A wake-up at such a time
need not look before it acts: the sessions due are known, and the guard of the signal (pid, backend_start,
state_change unchanged) proves each is still the session seen, in the state seen, so its ages only grew.
The loop therefore signals them and observes again in one statement (`observe(signals=...)`), deciding
with the same `decide.plan` as any cycle, over the sessions due with their ages carried forward.

The sessions signalled in that statement are still in its observation (one snapshot), and a terminated
backend may take a moment to exit: `SignalMemory` keeps the identity of every session signalled lately, so
no cycle signals one twice. Pure: no I/O, the caller passes the monotonic time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime

from pgwarden.engine.types import Observation, ObservedSession

SIGNAL_MEMORY_SECONDS = 5.0
"""How long a signalled session is left out of later decisions: ample for a terminated backend to exit
(milliseconds, unless the server is overloaded); a cancel changes state_change, so it is a new identity."""

SessionIdentity = tuple[int, datetime, datetime | None]


def identity(session: ObservedSession) -> SessionIdentity:
    """The session as a signal's guard checks it: a new backend, or a new state, is another identity."""
    return (session.pid, session.backend_start, session.state_change)


def aged(session: ObservedSession, elapsed: float) -> ObservedSession:
    """The session `elapsed` seconds later, had it stayed as observed (the guard checks it did)."""

    def older(age: float | None) -> float | None:
        return None if age is None else age + elapsed

    return dataclasses.replace(
        session,
        state_age=older(session.state_age),
        query_age=older(session.query_age),
        transaction_age=older(session.transaction_age),
        connection_age=older(session.connection_age),
        blocked_waits=tuple(w + elapsed if w >= 0 else w for w in session.blocked_waits),
    )


def due_now(previous: Observation, now: float) -> Observation:
    """`previous` carried forward to `now`: only the upcoming sessions whose crossing has come, aged.

    `received_at` is never before the server's `now()` of the observation, so the ages carried forward are
    never more than the sessions' true ages: a session is never found due early.
    """
    elapsed = max(0.0, now - previous.received_at)
    due = tuple(aged(s, elapsed) for crossing, s in previous.upcoming if crossing <= elapsed)
    return dataclasses.replace(previous, sessions=due, upcoming=(), next_crossing=None, received_at=now)


@dataclass
class SignalMemory:
    """Sessions signalled in the last SIGNAL_MEMORY_SECONDS on one connection (every policy that uses it)."""

    _until: dict[SessionIdentity, float] = field(default_factory=dict)

    def remember(self, sessions: list[ObservedSession], now: float) -> None:
        for session in sessions:
            self._until[identity(session)] = now + SIGNAL_MEMORY_SECONDS

    def recent(self, now: float) -> set[SessionIdentity]:
        """The identities still remembered at `now` (the others are forgotten)."""
        for key in [k for k, until in self._until.items() if until <= now]:
            del self._until[key]
        return set(self._until)

    def without_recent(self, observation: Observation, now: float) -> Observation:
        """`observation` less the sessions signalled lately (counts unchanged: they were there)."""
        recent = self.recent(now)
        if not recent:
            return observation
        return dataclasses.replace(
            observation,
            sessions=tuple(s for s in observation.sessions if identity(s) not in recent),
            upcoming=tuple(u for u in observation.upcoming if identity(u[1]) not in recent),
        )
