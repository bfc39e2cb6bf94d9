"""What the engine sends: no user string ever in SQL text, and patterns whose SQL forms mean what fnmatch means.

The semantic check of the SQL forms against PostgreSQL itself is in tests/pg/test_engine_rules.py.
"""

from __future__ import annotations

import pytest

from pgwarden.engine.observe import compile_observation
from pgwarden.engine.patterns import (
    address_in,
    anchored_alternation,
    glob_to_like,
    glob_to_regex,
    matches_any,
    networks,
)
from pgwarden.policy import parse_spec

HOSTILE = "x'; drop table t; --"


def test_no_user_value_reaches_the_sql_text() -> None:
    spec = parse_spec(
        {
            "exclude": {"users": [HOSTILE], "databases": [HOSTILE + "[a]"], "applicationNames": ["$$" + HOSTILE]},
            "sessions": [
                {
                    "name": "r",
                    "action": "terminate",
                    "states": ["idle"],
                    "stateAge": "17m",
                    "users": [HOSTILE],
                    "databases": ["\\'; select 1; --"],
                    "applicationNames": ['"); drop table t; --'],
                    "clientAddresses": ["10.9.8.0/24"],
                }
            ],
            "connectionLimits": [{"name": "c", "groupBy": "database", "max": 12345, "users": [HOSTILE]}],
        }
    )
    query = compile_observation(spec, protected_pids={4242})
    text = query.statement.decode()
    for value in (HOSTILE, "drop table", "select 1", "10.9.8.0", "12345", "1020", "4242", "idle'"):
        assert value not in text
    values = repr(query.params)
    assert "drop table t" in values
    assert "12345" in values
    assert "1020.0" in values
    assert "4242" in values
    assert set(_placeholders(text)) == set(query.params)


def _placeholders(text: str) -> list[str]:
    out = []
    rest = text
    while "%(" in rest:
        rest = rest.split("%(", 1)[1]
        name, rest = rest.split(")s", 1)
        out.append(name)
    return out


def test_the_statement_depends_only_on_the_policy_shape() -> None:
    """Same structure, other values: the same text, so a prepared statement is reused across policies."""
    a = parse_spec({"sessions": [{"name": "a", "action": "terminate", "stateAge": "1m", "users": ["x"]}]})
    b = parse_spec({"sessions": [{"name": "b", "action": "cancel", "stateAge": "1h", "users": ["y*"]}]})
    assert compile_observation(a).statement == compile_observation(b).statement


@pytest.mark.parametrize(
    ("glob", "like"),
    [
        ("web-*", "web-%"),
        ("a?c", "a_c"),
        ("100%_done\\", "100\\%\\_done\\\\"),
        ("[ab]", None),
        ("plain", "plain"),
    ],
)
def test_glob_to_like(glob: str, like: str | None) -> None:
    assert glob_to_like(glob) == like


@pytest.mark.parametrize(
    ("glob", "regex"),
    [
        ("a*b", "a.*b"),
        ("a**b", "a.*b"),
        ("a?", "a."),
        ("a.b", "a\\.b"),
        ("[a-c]", "[a-c]"),
        ("[!a]", "[^a]"),
        ("[]]", "[\\]]"),
        ("[", "\\["),
        ("[!z-a]", "."),
        ("é", "é"),
    ],
)
def test_glob_to_regex(glob: str, regex: str) -> None:
    assert glob_to_regex(glob) == regex


def test_empty_sets_can_never_match() -> None:
    assert glob_to_regex("a[z-a]") is None
    assert anchored_alternation(["[z-a]"]) is None
    assert anchored_alternation(["[z-a]", "b*"]) == "^(?:b.*)$"


def test_python_side_matching() -> None:
    assert matches_any("anything", [])
    assert matches_any(None, [])
    assert not matches_any(None, ["*"])
    assert matches_any("web-1", ["api", "web-?"])
    nets = networks(["10.0.0.1/8", "fd00::/8"])
    assert address_in("10.200.0.1", nets)
    assert address_in("fd00::5", nets)
    assert not address_in("11.0.0.1", nets)
    assert not address_in(None, nets)
    assert address_in(None, [])
    assert not address_in("not-an-address", nets)
