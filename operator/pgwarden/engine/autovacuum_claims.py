"""Which enforcing policy wants which autovacuum_max_workers on which server, in this process and in others.

Two policies that select one pod with different caps would otherwise take turns: each cycle of one finds
the other's value in postgresql.auto.conf and writes its own again, reloading the server every interval,
forever. The server cannot say which policy wrote a value (postgresql.auto.conf holds no comments, and a
second setting as a marker would be a second ALTER SYSTEM and another grant), so claims are kept apart from
the file, in two registers:

- in this process, `CapClaims`: the engine sees every cycle of every policy; each cycle claims its value for
  its server here, and a policy whose server has a live claim by another policy for another value writes
  nothing (nor stops workers) and reports the conflict, naming the other. Claims lapse when their policy
  stops claiming (deleted, cap removed, dry run).
- across processes (a CLI loop, a second operator, a sidecar beside the controller), the server itself:
  each engine connection holds a session-level *shared advisory lock* keyed (`CLAIM_LOCK_CLASS`, value) for
  every value its policies claim, and reads `pg_locks` for the other sessions' keys. Any role may take
  advisory locks and read `pg_locks`, a shared lock never blocks anybody, and the claim dies with the
  connection: a killed process leaves no claim behind.

Each claim also remembers what its policy last wrote there (`last_written`), so a value in
postgresql.auto.conf that pgwarden did not write (a DBA's ALTER SYSTEM) is reported, not overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

CLAIM_INTERVALS = 3
"""A claim lives this many of its policy's intervals after its last cycle (a slow cycle must not let it lapse)."""
CLAIM_MIN_SECONDS = 10.0

CLAIM_LOCK_CLASS = 0x70677764
"""The first key of pgwarden's advisory locks ('pgwd'); the second is the autovacuum_max_workers claimed.
In pg_locks: locktype 'advisory', classid this, objid the value, objsubid 2 (the two-key form)."""


@dataclass
class _Claim:
    value: int
    expires: float
    written: int | None = None
    """What this policy last wrote on this server with ALTER SYSTEM (None: nothing yet, in this process)."""


@dataclass
class CapClaims:
    clock: Callable[[], float] = time.monotonic
    _claims: dict[str, dict[str, _Claim]] = field(default_factory=dict)

    def claim(self, server: str, policy: str, value: int, interval: float) -> dict[str, int]:
        """Record `policy`'s wish for `value` on `server`; return the other live claims there that differ."""
        now = self.clock()
        claims = self._claims.setdefault(server, {})
        expires = now + max(CLAIM_MIN_SECONDS, CLAIM_INTERVALS * interval)
        previous = claims.get(policy)
        claims[policy] = _Claim(value, expires, previous.written if previous is not None else None)
        for other, entry in list(claims.items()):
            if entry.expires < now:
                del claims[other]
        return {other: c.value for other, c in sorted(claims.items()) if other != policy and c.value != value}

    def drop(self, server: str, policy: str) -> None:
        """`policy` wants no cap on `server` any more (or only looks: a dry run never writes)."""
        claims = self._claims.get(server)
        if claims is not None:
            claims.pop(policy, None)
            if not claims:
                del self._claims[server]

    def record_write(self, server: str, policy: str, value: int) -> None:
        """`policy` wrote `value` on `server` (its claim exists: the cycle claims before it writes)."""
        entry = (self._claims.get(server) or {}).get(policy)
        if entry is not None:
            entry.written = value

    def remember(self, server: str, policy: str, value: int, written: int, interval: float) -> None:
        """What `policy` (wanting `value`) wrote on `server` in an earlier life of this process, as its status
        records it: the claim is made now, and what was written is kept unless this process knows better."""
        claims = self._claims.setdefault(server, {})
        entry = claims.get(policy)
        if entry is None:
            expires = self.clock() + max(CLAIM_MIN_SECONDS, CLAIM_INTERVALS * interval)
            claims[policy] = _Claim(value, expires, written)
        elif entry.written is None:
            entry.written = written

    def last_written(self, server: str, policy: str) -> int | None:
        entry = (self._claims.get(server) or {}).get(policy)
        return entry.written if entry is not None else None


CLAIMS = CapClaims()
"""The process's claims: one per process, as the servers it enforces on are."""


def conflict_message(policy: str, value: int, others: dict[str, int]) -> str:
    named = ", ".join(f"policy {other} wants {v}" for other, v in others.items())
    return (
        f"autovacuum_max_workers conflict on this server: {named}, policy {policy} wants {value}; "
        "neither writes it until the policies agree"
    )


def process_conflict_name(pid: int, value: int) -> str:
    """How a claim of another pgwarden process is named (its backend pid: the server knows no policy names)."""
    return f"another pgwarden process (backend pid {pid}) wants {value}"


def process_conflict_message(policy: str, value: int, others: dict[int, int]) -> str:
    named = ", ".join(process_conflict_name(pid, v) for pid, v in sorted(others.items()))
    return (
        f"autovacuum_max_workers conflict on this server: {named}, policy {policy} wants {value}; "
        "neither writes it until they agree"
    )
