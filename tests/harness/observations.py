"""Observations and specs for the pure decision's unit tests, built without a server."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from pgwarden.engine.types import Observation, ObservedSession
from pgwarden.policy import PolicySpec, parse_spec

_pids = itertools.count(1000)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def session(
    state: str | None = "idle",
    *,
    age: float | None = 100.0,
    user: str | None = "app",
    database: str | None = "shop",
    app: str | None = "web",
    addr: str | None = "10.0.0.7",
    query_age: float | None = None,
    xact_age: float | None = None,
    connection_age: float | None = None,
    backend_type: str = "client backend",
    pid: int | None = None,
    superuser: bool = False,
    permitted: bool = True,
) -> ObservedSession:
    return ObservedSession(
        pid=next(_pids) if pid is None else pid,
        user=user,
        database=database,
        application_name=app,
        client_address=addr,
        state=state,
        backend_start=T0,
        state_change=T0 + timedelta(seconds=1),
        state_age=age,
        query_age=age if query_age is None else query_age,
        transaction_age=xact_age,
        connection_age=(age or 0) + 10 if connection_age is None else connection_age,
        backend_type=backend_type,
        superuser=superuser,
        permitted=permitted,
    )


def observation(
    *sessions: ObservedSession,
    clients: int | None = None,
    next_crossing: float | None = None,
    own_roles: tuple[str, ...] = ("warden",),
) -> Observation:
    return Observation(
        own_roles=own_roles,
        server_version="18.6",
        own_pid=1,
        backends={"client backend": len(sessions) + 1 if clients is None else clients},
        client_states={},
        sessions=tuple(sessions),
        next_crossing=next_crossing,
    )


def spec(**fields: Any) -> PolicySpec:
    fields.setdefault("limits", {"maxActionsPerCycle": 1000, "maxFractionPerCycle": 1.0})
    return parse_spec(fields)
