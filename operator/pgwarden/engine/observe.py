"""One read of `pg_stat_activity` per cycle: process counts, and only the sessions a rule could act on.

On a server with thousands of idle sessions the engine must cost about one read of the view, so the
rules are evaluated in SQL and only sessions that match a rule now, or sit in a group over a connection
limit, cross the wire. The same statement returns the process counts and the time until the next
session seen now crosses a rule's threshold (the scheduler's next deadline).

The statement's *shape* follows the policy (one expression per rule, composed with `psycopg.sql` from
fixed fragments); every value a user wrote (patterns, CIDRs, states, thresholds, caps) is a parameter.
Ages are computed by the server against its own `now()`, never the client's clock.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgwarden.engine.errors import QueryFailed, TargetUnreachable
from pgwarden.engine.patterns import anchored_alternation, networks
from pgwarden.policy.model import ConnectionLimit, GroupBy, PolicySpec, SessionFilters

CLIENT_BACKEND = "client backend"
UNKNOWN_STATE = "unknown"
"""Key for client backends whose state is NULL (sessions the engine's role may not look into)."""

_AGE_COLUMNS = {
    "state_change": "state_age",
    "query_start": "query_age",
    "xact_start": "xact_age",
    "backend_start": "connection_age",
}
_GROUP_COLUMNS = {
    GroupBy.USER: "usename",
    GroupBy.DATABASE: "datname",
    GroupBy.APPLICATION_NAME: "application_name",
    GroupBy.CLIENT_ADDRESS: "client_addr",
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

    def age(self, column: str) -> float | None:
        """The age measured from a pg_stat_activity timestamp column (see SessionRule.ages)."""
        return {
            "state_change": self.state_age,
            "query_start": self.query_age,
            "xact_start": self.transaction_age,
            "backend_start": self.connection_age,
        }[column]


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

    @property
    def client_backends(self) -> int:
        return self.backends.get(CLIENT_BACKEND, 0)


@dataclass(frozen=True)
class ObservationQuery:
    """The compiled statement for one policy; build once per spec, run every cycle."""

    statement: sql.Composed
    params: dict[str, Any]


class _Params:
    """Collects parameters under generated names, so the SQL text never holds a value."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def add(self, prefix: str, value: Any) -> sql.Composable:
        name = f"{prefix}_{len(self.values)}"
        self.values[name] = value
        return sql.Placeholder(name)


def _pattern_condition(column: str, patterns: Sequence[str], params: _Params) -> sql.Composable | None:
    if not patterns:
        return None
    regex = anchored_alternation(patterns)
    if regex is None:
        return sql.SQL("false")
    return sql.SQL("{} ~ {}").format(sql.Identifier(column), params.add("re", regex))


def _filter_conditions(filters: SessionFilters, params: _Params) -> list[sql.Composable]:
    conditions = [
        _pattern_condition("usename", filters.users, params),
        _pattern_condition("datname", filters.databases, params),
        _pattern_condition("application_name", filters.application_names, params),
    ]
    if filters.client_addresses:
        cidrs = [str(net) for net in networks(filters.client_addresses)]
        conditions.append(sql.SQL("client_addr <<= ANY({}::cidr[])").format(params.add("cidrs", cidrs)))
    return [c for c in conditions if c is not None]


def _conjunction(conditions: Sequence[sql.Composable]) -> sql.Composable:
    if not conditions:
        return sql.SQL("true")
    return sql.SQL("(") + sql.SQL(" AND ").join(conditions) + sql.SQL(")")


def _exclusions(spec: PolicySpec, params: _Params) -> list[sql.Composable]:
    """`col !~ re` is NULL for a NULL column, so a session whose name cannot be checked is left alone."""
    out: list[sql.Composable] = []
    for column, patterns in (
        ("usename", spec.exclude.users),
        ("datname", spec.exclude.databases),
        ("application_name", spec.exclude.application_names),
    ):
        regex = anchored_alternation(patterns) if patterns else None
        if regex is not None:
            out.append(sql.SQL("{} !~ {}").format(sql.Identifier(column), params.add("ex", regex)))
    return out


def _rule_wait(index: int, spec: PolicySpec, params: _Params) -> sql.Composable:
    """Seconds until the rule holds for the row (<= 0: holds now); NULL if it never can as things stand."""
    rule = spec.sessions[index]
    conditions = _filter_conditions(rule, params)
    if rule.states:
        conditions.append(
            sql.SQL("state = ANY({}::text[])").format(params.add("states", [s.value for s in rule.states]))
        )
    waits: list[sql.Composable] = []
    for column, threshold in rule.ages().items():
        if threshold is None:
            continue
        age = sql.Identifier(_AGE_COLUMNS[column])
        conditions.append(sql.SQL("{} IS NOT NULL").format(age))
        waits.append(sql.SQL("{}::float8 - {}").format(params.add("age", threshold.total_seconds()), age))
    return sql.SQL("CASE WHEN {} THEN greatest({}) END").format(_conjunction(conditions), sql.SQL(", ").join(waits))


def _over_limit(limit: ConnectionLimit, params: _Params) -> sql.Composable:
    """True for a row in the limit's scope whose group holds more in-scope sessions than the cap."""
    scope = _conjunction(_filter_conditions(limit, params))
    return sql.SQL(
        "(CASE WHEN {scope} THEN count(*) FILTER (WHERE {scope}) OVER (PARTITION BY {group}) > {cap} END)"
    ).format(scope=scope, group=sql.Identifier(_GROUP_COLUMNS[limit.group_by]), cap=params.add("cap", limit.max))


_TEMPLATE = """
WITH a AS MATERIALIZED (
    SELECT pid, backend_type, state, usename::text AS usename, datname::text AS datname, application_name,
           client_addr, backend_start, state_change, query_start, xact_start
    FROM pg_stat_activity
),
c AS (
    SELECT a.*,
           date_part('epoch', now() - state_change) AS state_age,
           date_part('epoch', now() - query_start) AS query_age,
           date_part('epoch', now() - xact_start) AS xact_age,
           date_part('epoch', now() - backend_start) AS connection_age
    FROM a
    WHERE backend_type = 'client backend'
      AND pid <> pg_backend_pid()
      AND pid <> ALL({protected}::int[])
      AND backend_start IS NOT NULL
      {exclusions}
),
w AS (
    SELECT c.*, {wait} AS wait, {over} AS over
    FROM c
)
SELECT 0 AS kind,
       split_part(current_setting('server_version'), ' ', 1) AS server_version,
       pg_backend_pid() AS own_pid,
       (SELECT json_object_agg(t, n ORDER BY t) FROM (
            SELECT coalesce(backend_type, 'unknown') AS t, count(*) AS n FROM a GROUP BY 1) AS b) AS backends,
       (SELECT json_object_agg(t, n ORDER BY t) FROM (
            SELECT coalesce(state, {unknown}) AS t, count(*) AS n FROM a
            WHERE backend_type = 'client backend' GROUP BY 1) AS s) AS client_states,
       (SELECT min(wait) FROM w WHERE wait > 0) AS next_crossing,
       NULL::int AS pid, NULL::text AS usename, NULL::text AS datname, NULL::text AS application_name,
       NULL::text AS client_addr, NULL::text AS state, NULL::timestamptz AS backend_start,
       NULL::timestamptz AS state_change, NULL::float8 AS state_age, NULL::float8 AS query_age,
       NULL::float8 AS xact_age, NULL::float8 AS connection_age
UNION ALL
SELECT 1, NULL, NULL, NULL, NULL, NULL,
       pid, usename, datname, application_name, host(client_addr), state, backend_start,
       state_change, state_age, query_age, xact_age, connection_age
FROM w
WHERE wait <= 0 OR over
"""


def compile_observation(spec: PolicySpec, protected_pids: Collection[int] = ()) -> ObservationQuery:
    """Build the statement for `spec`: rules become expressions, user values become parameters."""
    params = _Params()
    protected = params.add("pids", sorted(set(protected_pids)))
    exclusions = _exclusions(spec, params)
    waits = [_rule_wait(i, spec, params) for i in range(len(spec.sessions))]
    if not waits:
        wait: sql.Composable = sql.SQL("NULL::float8")
    elif len(waits) == 1:
        wait = waits[0]
    else:
        wait = sql.SQL("least({})").format(sql.SQL(", ").join(waits))
    overs = [_over_limit(limit, params) for limit in spec.connection_limits]
    over: sql.Composable = (
        sql.SQL("coalesce({}, false)").format(sql.SQL(" OR ").join(overs)) if overs else sql.SQL("false")
    )
    statement = sql.SQL(_TEMPLATE).format(
        protected=protected,
        exclusions=sql.SQL("").join(sql.SQL(" AND ") + e for e in exclusions),
        wait=wait,
        over=over,
        unknown=sql.Literal(UNKNOWN_STATE),
    )
    return ObservationQuery(statement=statement, params=params.values)


def _int_map(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in (value or {}).items()}


async def observe(conn: psycopg.AsyncConnection[Any], query: ObservationQuery, *, target: str = "") -> Observation:
    """Run the compiled observation; errors become TargetUnreachable (connection gone) or QueryFailed."""
    try:
        cur = await conn.execute(query.statement, query.params)
        rows = await cur.fetchall()
        received_at = time.monotonic()
    except psycopg.Error as exc:
        where = f" on {target}" if target else ""
        message = f"reading pg_stat_activity{where}: {str(exc).strip()}"
        if conn.broken or conn.closed:
            raise TargetUnreachable(message) from None
        raise QueryFailed(message) from None
    summary: tuple[Any, ...] | None = None
    sessions: list[ObservedSession] = []
    for row in rows:
        if row[0] == 0:
            summary = row
            continue
        sessions.append(
            ObservedSession(
                pid=row[6],
                user=row[7],
                database=row[8],
                application_name=row[9],
                client_address=row[10],
                state=row[11],
                backend_start=row[12],
                state_change=row[13],
                state_age=row[14],
                query_age=row[15],
                transaction_age=row[16],
                connection_age=row[17],
            )
        )
    if summary is None:  # cannot happen: the summary branch always yields one row
        raise QueryFailed("reading pg_stat_activity: the server returned no summary row")
    return Observation(
        server_version=str(summary[1]),
        own_pid=int(summary[2]),
        backends=_int_map(summary[3]),
        client_states=_int_map(summary[4]),
        sessions=tuple(sessions),
        next_crossing=None if summary[5] is None else float(summary[5]),
        received_at=received_at,
    )
