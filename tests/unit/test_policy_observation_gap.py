"""Look-ahead scheduling's one number: how long a target may go unobserved (PolicySpec.observation_gap)."""

from __future__ import annotations

from typing import Any

import pytest

from pgwarden.policy import parse_spec


def _rule(**ages: Any) -> dict[str, Any]:
    return {"name": f"r{len(ages)}-{'-'.join(ages)}".lower(), "action": "terminate", **ages}


@pytest.mark.parametrize(
    ("interval", "rules", "gap"),
    [
        ("30s", [], 30.0),  # nothing to cross: interval
        ("30s", [_rule(stateAge="10s")], 10.0),  # a shorter threshold: observe once per threshold
        ("30s", [_rule(stateAge="10m")], 30.0),  # a longer one: interval still bounds the gap
        ("30s", [_rule(stateAge="10m", queryAge="5s")], 5.0),  # every age counts
        ("30s", [_rule(stateAge="1m"), _rule(transactionAge="20s")], 20.0),  # every rule counts
        ("30s", [_rule(connectionAge="0s")], 30.0),  # zero matches at the next look anyway
        ("30s", [_rule(blocking={"minBlocked": 1, "minWait": "7s"})], 7.0),  # a blocker's wait is a threshold
        ("1s", [_rule(stateAge="500ms")], 0.5),  # the loops still keep the wake floor between evaluations
    ],
)
def test_the_gap_is_the_interval_or_the_shortest_positive_threshold(
    interval: str, rules: list[dict[str, Any]], gap: float
) -> None:
    assert parse_spec({"interval": interval, "sessions": rules}).observation_gap() == gap
