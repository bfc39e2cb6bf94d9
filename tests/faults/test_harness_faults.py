"""The fault harness itself: each fault really happens, and each one is really undone.

A fault test that "passes" because its fault never took effect proves nothing, so the injectors are
checked here against a real server first.
"""

from __future__ import annotations

import itertools
import select
from typing import Any

import psycopg
import pytest

from tests.fixtures.postgres import PgFactory
from tests.harness.faults import AUTH_CLEARTEXT, AUTH_MD5, Impostor, Relay, frozen, frozen_server
from tests.harness.postgres import PgServer, free_port

pytestmark = pytest.mark.pg

_octets = itertools.count(10)
PASSWORD = "harness-Pa55word"


def next_host() -> str:
    return f"127.0.{next(_octets)}.41"


def answers_within(conn: psycopg.Connection[Any], seconds: float, *, send: bool = True) -> bool:
    """Send `SELECT 1` (unless one is already pending) and say whether an answer arrives within `seconds`.

    An answer is read to the end, so the connection can be used again; a missing one stays pending.
    """
    if send:
        conn.pgconn.send_query(b"SELECT 1")
        conn.pgconn.flush()
    readable, _, _ = select.select([conn.pgconn.socket], [], [], seconds)
    if readable:
        while conn.pgconn.get_result() is not None:
            pass
    return bool(readable)


def test_frozen_backend_stops_answering_and_thaws(pg: PgServer) -> None:
    session = pg.open_session("idle")
    with frozen(session.pid):
        assert not answers_within(session.conn, 1.0)
        with pg.connect() as probe:  # the rest of the server still answers
            assert probe.execute("SELECT 1").fetchone() == (1,)
    assert answers_within(session.conn, 5.0, send=False)


def test_frozen_server_refuses_nothing_and_answers_nothing(pg_factory: PgFactory) -> None:
    server = pg_factory(host=next_host())
    with frozen_server(server), pytest.raises(psycopg.OperationalError, match="timeout"):
        psycopg.connect(server.dsn(connect_timeout="2"))
    with psycopg.connect(server.dsn(connect_timeout="5")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_relay_passes_blackholes_and_resets(pg: PgServer) -> None:
    host = next_host()
    with Relay(host, free_port(host), (pg.host, pg.port)) as relay:
        dsn = psycopg.conninfo.make_conninfo(
            host=host, port=str(relay.port), user="postgres", dbname="postgres", connect_timeout="2"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            relay.set_mode("reset")
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            conn.close()  # the reset can leave the query pending: leaving the block would try to COMMIT, and leak
        relay.set_mode("blackhole")
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            psycopg.connect(dsn)
        relay.set_mode("pass")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert answers_within(conn, 5.0)
            relay.set_mode("blackhole")  # established connections stop forwarding, silently
            assert not answers_within(conn, 1.0)
            conn.close()  # with the query still pending: leaving the block would try to COMMIT


@pytest.mark.parametrize("auth_code", [AUTH_CLEARTEXT, AUTH_MD5])
def test_impostor_receives_the_password_from_a_client_that_does_not_require_scram(auth_code: int) -> None:
    host = next_host()
    with Impostor(host, free_port(host), auth_code=auth_code) as impostor:
        dsn = psycopg.conninfo.make_conninfo(
            host=host, port=str(impostor.port), user="warden", password=PASSWORD, connect_timeout="3", sslmode="disable"
        )
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn)
        assert impostor.startups == 1
        assert len(impostor.passwords) == 1  # the attack is real without require_auth
        with pytest.raises(psycopg.OperationalError, match="scram-sha-256"):
            psycopg.connect(dsn + " require_auth=scram-sha-256")
        assert impostor.startups == 2
        assert len(impostor.passwords) == 1
