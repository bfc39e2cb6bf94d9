"""Which sessions a policy's session rules will select next, and when: the look-ahead of `kubectl pgwarden explain`.

A cycle's observation returns only the sessions a rule selects *now* (plus the time of the next crossing),
so a dry run tells what would be done now but not who comes next. The look-ahead runs the same observation
statement (`observe.compile_observation`) for the policy with every age threshold at zero, which returns
every candidate in a rule's states and filters together with its ages; the real thresholds are then applied
here, in Python, by the same matchers the decision uses (`decide.RuleMatcher`). It only reads: nothing is
signalled and nothing is written.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgwarden.engine.decide import RuleMatcher, is_own, is_protected
from pgwarden.engine.errors import EngineError
from pgwarden.engine.observe import compile_observation, observe
from pgwarden.engine.session import TargetSession
from pgwarden.engine.types import Observation, ObservedSession
from pgwarden.policy.model import PolicySpec, SessionRule

_AGE_FIELDS = ("state_age", "query_age", "transaction_age", "connection_age")


@dataclass(frozen=True)
class Crossing:
    """A session a rule will select once `seconds` have passed (0: it already would), as things stand."""

    rule: str
    action: str
    session: ObservedSession
    seconds: float
    """Seconds after the observation; assumes the session stays as it is (a new query resets its ages)."""


def _at_zero(rule: SessionRule) -> SessionRule:
    """`rule` with every age it sets (and a blocking rule's minWait) at zero: it matches every session in its
    states and filters that has the ages it measures, so the observation returns them all."""
    update: dict[str, Any] = {name: timedelta(0) for name in _AGE_FIELDS if getattr(rule, name) is not None}
    if rule.blocking is not None:
        update["blocking"] = rule.blocking.model_copy(update={"min_wait": timedelta(0)})
    return rule.model_copy(update=update)


def look_ahead_spec(spec: PolicySpec) -> PolicySpec:
    """The spec the look-ahead observes with: its session rules at zero age, no connection limits (a cap
    is crossed by a new connection, not by time passing)."""
    return spec.model_copy(update={"sessions": [_at_zero(r) for r in spec.sessions], "connection_limits": []})


def crossings(observation: Observation, spec: PolicySpec, protected_pids: Collection[int] = ()) -> list[Crossing]:
    """For every candidate, the first rule it will match and when, soonest first (pure: no I/O, no clock).

    The rule that matches a session first is the one with the shortest wait (ties: the earlier rule), which
    is also the rule a cycle at that moment would pick, since rules are tried in order and the others do
    not match yet. Sessions no rule can match as they stand (wrong state, outside every filter) are left out.
    """
    protected = {observation.own_pid, *protected_pids}
    matchers = [RuleMatcher.of(rule) for rule in spec.sessions]
    out: list[Crossing] = []
    for session in observation.sessions:
        if is_protected(session, spec.exclude, protected) or is_own(session, observation.own_roles):
            continue
        soonest = _soonest(matchers, session)
        if soonest is not None:
            matcher, wait = soonest
            out.append(Crossing(matcher.rule.name, matcher.rule.action.value, session, wait))
    return sorted(out, key=lambda c: (c.seconds, c.session.pid))


def _soonest(matchers: Sequence[RuleMatcher], session: ObservedSession) -> tuple[RuleMatcher, float] | None:
    best: tuple[RuleMatcher, float] | None = None
    for matcher in matchers:
        if matcher.states and session.state not in matcher.states:
            continue
        if not matcher.scope(session):
            continue
        margin = matcher.overshoot(session)
        if margin is None:
            continue
        wait = max(0.0, -margin)
        if best is None or wait < best[1]:
            best = (matcher, wait)
    return best


async def look_ahead(session: TargetSession, spec: PolicySpec) -> list[Crossing]:
    """Read the server once and list every session a rule will select, soonest first (read-only)."""
    try:
        await session.ensure_connected()
        conn = await session.connection()
        query = compile_observation(look_ahead_spec(spec), session.protected_pids)
        observation = await observe(conn, query, target=session.target)
    except EngineError as exc:  # a server message may quote a credential, as in TargetSession.run
        raise type(exc)(session.dsn.redact(str(exc))) from None
    return crossings(observation, spec, session.protected_pids)
