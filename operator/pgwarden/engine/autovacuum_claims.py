"""Which enforcing policy of this process wants which autovacuum_max_workers on which server.

Two policies that select one pod with different caps would otherwise take turns: each cycle of one finds
the other's value in postgresql.auto.conf and writes its own again, reloading the server every interval,
forever. The server cannot say which policy wrote a value (postgresql.auto.conf holds no comments, and a
second setting as a marker would be a second ALTER SYSTEM and another grant), but the engine of this process
sees every cycle of every policy: each cycle claims its value for its server here, and a policy whose server
has a live claim by another policy for another value writes nothing (nor stops workers) and reports the
conflict, naming the other. Claims lapse when their policy stops claiming (deleted, cap removed, dry run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

CLAIM_INTERVALS = 3
"""A claim lives this many of its policy's intervals after its last cycle (a slow cycle must not let it lapse)."""
CLAIM_MIN_SECONDS = 10.0


@dataclass
class CapClaims:
    clock: Callable[[], float] = time.monotonic
    _claims: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)

    def claim(self, server: str, policy: str, value: int, interval: float) -> dict[str, int]:
        """Record `policy`'s wish for `value` on `server`; return the other live claims there that differ."""
        now = self.clock()
        claims = self._claims.setdefault(server, {})
        claims[policy] = (value, now + max(CLAIM_MIN_SECONDS, CLAIM_INTERVALS * interval))
        for other, (_, expires) in list(claims.items()):
            if expires < now:
                del claims[other]
        return {other: v for other, (v, _) in sorted(claims.items()) if other != policy and v != value}

    def drop(self, server: str, policy: str) -> None:
        """`policy` wants no cap on `server` any more (or only looks: a dry run never writes)."""
        claims = self._claims.get(server)
        if claims is not None:
            claims.pop(policy, None)
            if not claims:
                del self._claims[server]


CLAIMS = CapClaims()
"""The process's claims: one per process, as the servers it enforces on are."""


def conflict_message(policy: str, value: int, others: dict[str, int]) -> str:
    named = ", ".join(f"policy {other} wants {v}" for other, v in others.items())
    return (
        f"autovacuum_max_workers conflict on this server: {named}, policy {policy} wants {value}; "
        "neither writes it until the policies agree"
    )
