"""What to do this cycle, as pure functions of an observation and a spec: no I/O, no clock.

Modelled on CloudNativePG's `evaluateNextRoleActions`: the decision has no side effects, so every rule,
protection and limit can be tested without a server. The observation query already narrowed the
sessions in SQL; everything is checked again here, so a session is only ever acted on when both the SQL
filter and these functions agree (a mistake in either one can only make the engine do less).

Order of decisions:
1. built-in protections (pgwarden's own sessions in any process, non-client backends) and `exclude`
   (never a candidate);
2. sessions the engine's role may not signal (a superuser's, when it is not one) are never candidates
   either: those a rule matches are reported as skipped `notPermitted` and use none of the budget;
3. session rules, in order: a session is acted on by the first rule it matches;
4. connection limits, in order, over what is left: sessions above `max` per group, idle first;
5. blast-radius limits over that ordered list, less what this policy already did on this target in the
   current window of length `interval`; what they hold back is kept in order as the reserve (a signal
   PostgreSQL refuses gives its slot to the next one) and reported as skipped with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from pgwarden.engine.patterns import IpNetwork, address_in, matches_any, networks
from pgwarden.engine.report import SkipRecord
from pgwarden.engine.types import CLIENT_BACKEND, OWN_APPLICATION_PREFIX, Observation, ObservedSession
from pgwarden.policy.api import SkipReason
from pgwarden.policy.model import (
    ConnectionLimit,
    Exclude,
    GroupBy,
    Limits,
    PolicySpec,
    SessionAction,
    SessionFilters,
    SessionRule,
)

# Which sessions a connection limit gives up first: plain idle ones lose no work, an aborted transaction can
# only roll back, an open transaction loses its work; active ones only with includeActive (rank 3).
_VICTIM_RANK = {"idle": 0, "idle in transaction (aborted)": 1, "idle in transaction": 2}
_ACTIVE_RANK = 3


@dataclass(frozen=True)
class PlannedAction:
    """A session the engine means to signal, and the rule (or connection limit) that chose it."""

    rule: str
    action: SessionAction
    session: ObservedSession
    blocking: bool = False
    """Chosen for blocking others (a `blocking` rule): the signal is sent only if it still blocks one of them."""


@dataclass(frozen=True)
class Plan:
    """The decision for one cycle: what to signal (in order), what the blast radius held back, when to look again."""

    actions: tuple[PlannedAction, ...]
    skipped: tuple[SkipRecord, ...]
    """Held back by the blast radius (the reserve, reported unless acting uses it) and not permitted."""
    next_deadline: float | None
    """Seconds after the observation when a session seen now next crosses a rule's thresholds."""
    reserve: tuple[PlannedAction, ...] = ()
    """What the blast radius held back, in order: acting gives a refused signal's slot to the next of these."""
    reserve_reason: str = SkipReason.MAX_ACTIONS


# -- protections ---------------------------------------------------------------------------------------


def is_own(session: ObservedSession, own_roles: Collection[str]) -> bool:
    """pgwarden's own session in any process: the engine's login role and a pgwarden application name."""
    return session.user in own_roles and (session.application_name or "").startswith(OWN_APPLICATION_PREFIX)


def is_protected(session: ObservedSession, exclude: Exclude, protected_pids: Collection[int]) -> bool:
    """Built-in protections and the policy's excludes; True means no rule may touch the session.

    Only client backends are ever candidates: walsenders (every replication connection, physical or
    logical), autovacuum, background and parallel workers all have another backend_type. The engine's own
    sessions are in `protected_pids`. A NULL name cannot be checked against an exclude, so it protects.
    """
    if session.backend_type != CLIENT_BACKEND or session.pid in protected_pids:
        return True
    for value, patterns in (
        (session.user, exclude.users),
        (session.database, exclude.databases),
        (session.application_name, exclude.application_names),
    ):
        if patterns and (value is None or matches_any(value, patterns)):
            return True
    return False


# -- session rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScopeMatcher:
    """The optional filters shared by session rules and connection limits, prepared once per cycle."""

    users: tuple[str, ...]
    databases: tuple[str, ...]
    application_names: tuple[str, ...]
    nets: tuple[IpNetwork, ...]

    @classmethod
    def of(cls, filters: SessionFilters) -> ScopeMatcher:
        return cls(
            tuple(filters.users),
            tuple(filters.databases),
            tuple(filters.application_names),
            tuple(networks(filters.client_addresses)),
        )

    def __call__(self, session: ObservedSession) -> bool:
        return (
            matches_any(session.user, self.users)
            and matches_any(session.database, self.databases)
            and matches_any(session.application_name, self.application_names)
            and address_in(session.client_address, self.nets)
        )


@dataclass(frozen=True)
class RuleMatcher:
    """A session rule prepared for matching many sessions."""

    rule: SessionRule
    states: frozenset[str]
    thresholds: tuple[tuple[str, float], ...]
    scope: ScopeMatcher

    @classmethod
    def of(cls, rule: SessionRule) -> RuleMatcher:
        thresholds = tuple((col, t.total_seconds()) for col, t in rule.ages().items() if t is not None)
        return cls(rule, frozenset(s.value for s in rule.states), thresholds, ScopeMatcher.of(rule))

    def overshoot(self, session: ObservedSession) -> float | None:
        """Seconds past the latest of the thresholds (>= 0: all hold); None if an age is unknown, or the rule
        needs a blocker and the session is not one (see `SessionRule.blocking`)."""
        margin: float | None = None
        for column, threshold in self.thresholds:
            age = session.age(column)
            if age is None:
                return None
            margin = age - threshold if margin is None else min(margin, age - threshold)
        blocking = self.rule.blocking
        if blocking is not None:
            nth = blocking.min_blocked
            if session.waiting or len(session.blocked_waits) < nth or session.blocked_waits[nth - 1] < 0:
                return None
            lock_margin = session.blocked_waits[nth - 1] - blocking.min_wait.total_seconds()
            margin = lock_margin if margin is None else min(margin, lock_margin)
        return margin

    def __call__(self, session: ObservedSession) -> bool:
        if self.states and session.state not in self.states:
            return False
        margin = self.overshoot(session)
        return margin is not None and margin >= 0 and self.scope(session)


def in_scope(session: ObservedSession, filters: SessionFilters) -> bool:
    """Whether a session passes a rule's or limit's optional filters (empty lists match anything)."""
    return ScopeMatcher.of(filters)(session)


def rule_matches(rule: SessionRule, session: ObservedSession) -> bool:
    """Whether `rule` selects `session` now: state, every given age, and the filters."""
    return RuleMatcher.of(rule)(session)


def first_matching_rule(rules: Sequence[RuleMatcher], session: ObservedSession) -> tuple[int, RuleMatcher] | None:
    for index, rule in enumerate(rules):
        if rule(session):
            return index, rule
    return None


# -- connection limits -------------------------------------------------------------------------------


def group_key(limit: ConnectionLimit, session: ObservedSession) -> str | None:
    """The group a session counts in; Unix-socket sessions (no address) form one group of their own."""
    return {
        GroupBy.USER: session.user,
        GroupBy.DATABASE: session.database,
        GroupBy.APPLICATION_NAME: session.application_name,
        GroupBy.CLIENT_ADDRESS: session.client_address,
    }[limit.group_by]


def victim_order(session: ObservedSession) -> tuple[int, float, int]:
    """Sort key: idle first, then aborted, then idle in transaction, then active; longest in state first."""
    rank = _VICTIM_RANK.get(session.state or "", _ACTIVE_RANK)
    return (rank, -(session.state_age or 0.0), session.pid)


def limit_victims(
    limit: ConnectionLimit, sessions: Iterable[ObservedSession], taken: Collection[int]
) -> list[ObservedSession]:
    """Sessions above `limit.max` in each group, counting only sessions not already `taken` by a rule.

    `sessions` must hold every in-scope member of any group that may be over the cap (the observation
    returns whole over-cap groups); a partial group can only undercount, so never over-act.
    """
    scope = ScopeMatcher.of(limit)
    groups: dict[str | None, list[ObservedSession]] = {}
    for session in sessions:
        if session.pid in taken or not scope(session):
            continue
        groups.setdefault(group_key(limit, session), []).append(session)
    victims: list[ObservedSession] = []
    for key in sorted(groups, key=lambda k: (k is None, k or "")):
        members = groups[key]
        excess = len(members) - limit.max
        if excess <= 0:
            continue
        eligible = [
            s for s in sorted(members, key=victim_order) if limit.include_active or victim_order(s)[0] < _ACTIVE_RANK
        ]
        victims.extend(eligible[:excess])
    return victims


# -- blast radius ----------------------------------------------------------------------------------------


def allowed_actions(limits: Limits, client_backends: int) -> tuple[int, SkipReason]:
    """How many actions this cycle may take and which limit binds (reported as the skip reason)."""
    by_fraction = max(1, math.floor(limits.max_fraction_per_cycle * client_backends + 1e-9))
    if by_fraction < limits.max_actions_per_cycle:
        return by_fraction, SkipReason.MAX_FRACTION
    return limits.max_actions_per_cycle, SkipReason.MAX_ACTIONS


# -- the server's clock ---------------------------------------------------------------------------------

CLOCK_JUMP_LIMIT = 5.0
"""Seconds the server's clock may move against the engine's monotonic clock between two cycles."""


@dataclass(frozen=True)
class ClockMark:
    """The server's `now()` and the engine's `time.monotonic()` at one observation."""

    server: float
    local: float


def clock_step(previous: ClockMark | None, current: ClockMark) -> float:
    """How far the server's clock moved against the monotonic one since `previous` (0 for a first look).

    Ages are server `now()` minus server timestamps, so a step of the server's clock ages (or rejuvenates)
    every session at once; the monotonic clock never steps, so their difference is the step.
    """
    if previous is None:
        return 0.0
    return (current.server - previous.server) - (current.local - previous.local)


# -- the whole decision ------------------------------------------------------------------------------


def plan(observation: Observation, spec: PolicySpec, protected_pids: Collection[int] = (), *, used: int = 0) -> Plan:
    """Decide this cycle's actions from one observation (see the module docstring for the order).

    `used`: actions already taken on this target by this policy in the current window of length
    `interval` (see `pgwarden.engine.budget`); the limits bound the window, so they allow that many fewer.
    """
    protected = {observation.own_pid, *protected_pids}
    candidates = [
        s
        for s in observation.sessions
        if not is_protected(s, spec.exclude, protected) and not is_own(s, observation.own_roles)
    ]

    # Built only when there is a session to match (a quiet cycle returns none: see observe.py).
    rules = [RuleMatcher.of(rule) for rule in spec.sessions] if candidates else []
    by_rule: list[tuple[int, float, int, PlannedAction]] = []
    not_permitted: list[SkipRecord] = []
    for session in candidates:
        found = first_matching_rule(rules, session)
        if found is None:
            continue
        index, matcher = found
        if not session.permitted:
            not_permitted.append(SkipRecord(matcher.rule.name, session.pid, SkipReason.NOT_PERMITTED))
            continue
        margin = matcher.overshoot(session) or 0.0
        by_rule.append(
            (
                index,
                -margin,
                session.pid,
                PlannedAction(
                    matcher.rule.name, matcher.rule.action, session, blocking=matcher.rule.blocking is not None
                ),
            )
        )
    # Within a rule, the sessions furthest past its thresholds first: if the blast radius cuts the list,
    # the worst offenders are the ones handled.
    intents = [entry[3] for entry in sorted(by_rule, key=lambda e: e[:3])]

    # Sessions pgwarden may not signal neither count in a connection limit's groups nor become its victims.
    signalable = [s for s in candidates if s.permitted]
    taken = {p.session.pid for p in intents}
    for limit in spec.connection_limits:
        for victim in limit_victims(limit, signalable, taken):
            intents.append(PlannedAction(limit.name, SessionAction.TERMINATE, victim))
            taken.add(victim.pid)

    # The fraction is of the client backends there were when the window began: those this window's actions
    # ended still count. (Of the backends left now, maxFractionPerCycle: 1.0 would hold back the last few
    # sessions of a backlog for a whole window, the opposite of what 1.0 says.)
    allowed, reason = allowed_actions(spec.limits, observation.client_backends + used)
    allowed = max(0, allowed - used)
    actions, reserve = intents[:allowed], intents[allowed:]
    skipped = [*not_permitted, *(SkipRecord(p.rule, p.session.pid, reason) for p in reserve)]
    return Plan(
        actions=tuple(actions),
        skipped=tuple(skipped),
        next_deadline=observation.next_crossing,
        reserve=tuple(reserve),
        reserve_reason=reason,
    )
