"""Claims on a server's autovacuum_max_workers by the policies of one process (no server needed)."""

from __future__ import annotations

from pgwarden.engine.autovacuum_claims import CLAIM_MIN_SECONDS, CapClaims, conflict_message


def test_a_different_value_conflicts_an_equal_one_does_not_and_servers_are_apart() -> None:
    now = [0.0]
    claims = CapClaims(clock=lambda: now[0])
    assert claims.claim("10.0.0.1:5432", "ns/a", 2, interval=30) == {}
    assert claims.claim("10.0.0.1:5432", "ns/same", 2, interval=30) == {}
    assert claims.claim("10.0.0.2:5432", "ns/b", 3, interval=30) == {}
    assert claims.claim("10.0.0.1:5432", "ns/b", 3, interval=30) == {"ns/a": 2, "ns/same": 2}
    assert claims.claim("10.0.0.1:5432", "ns/a", 2, interval=30) == {"ns/b": 3}


def test_a_claim_lapses_when_dropped_or_not_renewed() -> None:
    now = [0.0]
    claims = CapClaims(clock=lambda: now[0])
    claims.claim("s", "ns/a", 2, interval=1)
    claims.claim("s", "ns/gone", 4, interval=1)
    claims.drop("s", "ns/a")
    now[0] = CLAIM_MIN_SECONDS + 0.1  # ns/gone stopped claiming (deleted): its claim expires
    assert claims.claim("s", "ns/b", 3, interval=1) == {}


def test_the_message_names_every_other_policy() -> None:
    message = conflict_message("ns/a", 2, {"ns/b": 3})
    assert "ns/b wants 3" in message
    assert "ns/a wants 2" in message
