"""Claims on a server's autovacuum_max_workers by the policies of one process (no server needed)."""

from __future__ import annotations

from pgwarden.engine.autovacuum_claims import (
    CLAIM_MIN_SECONDS,
    CapClaims,
    conflict_message,
    process_conflict_message,
)


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


def test_a_claim_remembers_what_its_policy_wrote_until_it_lapses() -> None:
    now = [0.0]
    claims = CapClaims(clock=lambda: now[0])
    claims.record_write("s", "ns/a", 2)  # no claim yet: nothing to remember it by
    assert claims.last_written("s", "ns/a") is None
    claims.claim("s", "ns/a", 2, interval=1)
    claims.record_write("s", "ns/a", 2)
    claims.claim("s", "ns/a", 3, interval=1)  # a changed cap keeps the memory of the last write
    assert claims.last_written("s", "ns/a") == 2
    assert claims.last_written("other", "ns/a") is None
    claims.drop("s", "ns/a")
    assert claims.last_written("s", "ns/a") is None


def test_a_conflict_with_another_process_names_its_backend() -> None:
    message = process_conflict_message("ns/a", 2, {4242: 3})
    assert "another pgwarden process (backend pid 4242) wants 3" in message
    assert "ns/a wants 2" in message
