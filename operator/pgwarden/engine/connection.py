"""The engine's own connection to one PostgreSQL server: bounded in time, named, and never leaking secrets.

Every statement the engine runs is short, so the connection carries a `statement_timeout` and a
`lock_timeout` in its startup packet: a busy or wedged server makes a cycle fail fast instead of hang.
Autocommit, because `ALTER SYSTEM` (autovacuum) cannot run in a transaction block and because each
observation must see a fresh `pg_stat_activity` snapshot (the snapshot is cached per transaction).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from pgwarden.engine.errors import InvalidDsn, TargetUnreachable

APPLICATION_NAME = "pgwarden"
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 5000
LOCK_TIMEOUT_MS = 2000

_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_MIN_MASKED_SECRET = 4  # shorter secrets would garble every message they happen to appear in


@dataclass(frozen=True)
class EngineDsn:
    """A parsed, validated DSN plus what the engine may say about it in public."""

    conninfo: str
    target: str
    password: str | None

    def redact(self, text: str) -> str:
        """Mask the password (and any conninfo-looking password) in a message meant for humans."""
        return redact(text, self.password)


def redact(text: str, password: str | None = None) -> str:
    """Remove passwords from `text`: a known password verbatim, and `password=` / URI user:password forms."""
    if password and len(password) >= _MIN_MASKED_SECRET:
        text = text.replace(password, "***")
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)


def format_target(host: str | None, port: str | int | None) -> str:
    """`HOST:PORT` as reports show it (IPv6 in brackets, a Unix socket directory as is)."""
    host = host or os.environ.get("PGHOST") or "localhost"
    port = port or os.environ.get("PGPORT") or "5432"
    if "," in str(host):
        host = str(host).split(",", 1)[0]
    if "," in str(port):
        port = str(port).split(",", 1)[0]
    if ":" in host and not host.startswith("/"):
        host = f"[{host}]"
    return f"{host}:{port}"


def parse_dsn(
    dsn: str,
    *,
    application_name: str = APPLICATION_NAME,
    connect_timeout: int = CONNECT_TIMEOUT_SECONDS,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> EngineDsn:
    """Turn a user's DSN (key=value or URI) into the engine's conninfo; raise InvalidDsn without echoing it.

    The engine's `statement_timeout`/`lock_timeout` go first in `options`, so an explicit setting in the
    user's own `options` still wins (someone who sets it knows why); `connect_timeout` is added only when
    neither the DSN nor PGCONNECT_TIMEOUT chose one.
    """
    try:
        params: dict[str, Any] = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        # libpq's message quotes the offending fragment, which may be part of a password.
        raise InvalidDsn(
            "--dsn is not a valid connection string: use key=value pairs (host=... dbname=...) or a postgresql:// URI"
        ) from None
    password = params.get("password")
    # search_path: the engine names only catalog objects, and must never resolve one through a schema some
    # other role can write to (pg_temp last, explicitly, or it would be searched first for relations).
    ours = (
        f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout={int(lock_timeout_ms)}"
        " -c search_path=pg_catalog,pg_temp"
    )
    user_options = params.get("options")
    params["options"] = f"{ours} {user_options}" if user_options else ours
    params["application_name"] = application_name
    if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
        params["connect_timeout"] = str(int(connect_timeout))
    return EngineDsn(
        conninfo=pg_conninfo.make_conninfo(**params),
        target=format_target(params.get("host") or params.get("hostaddr"), params.get("port")),
        password=str(password) if password else None,
    )


async def connect(dsn: EngineDsn | str) -> psycopg.AsyncConnection[Any]:
    """Open the engine's connection; failures become TargetUnreachable with a redacted message."""
    parsed = dsn if isinstance(dsn, EngineDsn) else parse_dsn(dsn)
    try:
        return await psycopg.AsyncConnection.connect(parsed.conninfo, autocommit=True)
    except psycopg.Error as exc:
        detail = parsed.redact(str(exc).strip().replace("\n", " ").replace("\t", ""))
        raise TargetUnreachable(f"cannot connect to {parsed.target}: {detail}") from None


def target_of(conn: psycopg.AsyncConnection[Any]) -> str:
    """`HOST:PORT` of an open connection, as the server was actually reached."""
    return format_target(conn.info.host, conn.info.port)
