"""The engine's own connection to one PostgreSQL server: bounded in time, named, and never leaking secrets.

Every statement the engine runs is short, so the connection carries a `statement_timeout` and a
`lock_timeout` in its startup packet: a busy or wedged server makes a cycle fail fast instead of hang.
Autocommit, because `ALTER SYSTEM` (autovacuum) cannot run in a transaction block and because each
observation must see a fresh `pg_stat_activity` snapshot (the snapshot is cached per transaction).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from pgwarden.engine.errors import AuthenticationFailed, InvalidDsn, TargetUnreachable

APPLICATION_NAME = "pgwarden"
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 5000
LOCK_TIMEOUT_MS = 2000
IDLE_SESSION_TIMEOUT = "idle_session_timeout"
REQUIRE_AUTH_DEFAULT = "scram-sha-256"
# `requireAuth` names the weakest password method pgwarden accepts; libpq's `require_auth` lists every
# method allowed. SCRAM proves the server knows the password too, and never shows it the password; md5
# shows a hash an eavesdropper can replay; `password` shows the password itself. "any": libpq decides.
REQUIRE_AUTH_METHODS: dict[str, str | None] = {
    "scram-sha-256": "scram-sha-256",
    "md5": "scram-sha-256,md5",
    "password": "scram-sha-256,md5,password",
    "any": None,
}
# A peer that vanishes (host gone, network partition) is noticed by TCP itself: probes after 10 s of
# silence, 3 unanswered 5 s apart; unacknowledged data gives up after 15 s (tcp_user_timeout).
TCP_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
}

_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_MIN_MASKED_SECRET = 4  # shorter secrets would garble every message they happen to appear in


# libpq's words for a failed login: the server's reply quotes the user name, which in the controller is a
# Secret's value (a policy author may point usernameKey at the password key), so none of it is repeated.
_AUTH_FAILURE = re.compile(
    r"authentication failed|role \S.* does not exist|password|no password supplied|SCRAM|"
    r"not permitted to log in|too many connections for role",
    re.IGNORECASE,
)
_HBA_REJECT = re.compile(r"pg_hba\.conf", re.IGNORECASE)
# ... except libpq's own refusal under require_auth, which names methods only: the message must say which.
_REQUIRE_AUTH_REFUSAL = re.compile(r'authentication method requirement "[^"]*" failed: [^\n]*')


@dataclass(frozen=True)
class EngineDsn:
    """A parsed, validated DSN plus what the engine may say about it in public."""

    conninfo: str
    target: str
    conninfo_before_14: str | None = field(default=None, repr=False)
    """The same without `idle_session_timeout`, which a server before PostgreSQL 14 refuses to start with."""
    password: str | None = field(default=None, repr=False)
    user: str | None = field(default=None, repr=False)
    credentials_source: str = "the connection string"
    """Where the user and password came from, as messages name it ("Secret NAME"): never their values."""

    def redact(self, text: str) -> str:
        """Mask the user name and password (and conninfo-looking passwords) in a message meant for humans."""
        return redact(text, self.password, self.user)


def redact(text: str, password: str | None = None, user: str | None = None) -> str:
    """Remove credentials from `text`: known values verbatim, and `password=` / URI user:password forms.

    A user name is a credential too: a Secret's key may hold anything, and a policy can name any key.
    """
    for secret in (password, user):
        if not secret:
            continue
        text = text.replace(f'"{secret}"', '"***"')  # quoted, as server messages name roles: any length
        if len(secret) >= _MIN_MASKED_SECRET:
            text = text.replace(secret, "***")
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)


def is_authentication_failure(message: str) -> bool:
    """Whether a failed connection attempt was a refused login (see `connect_failure`, which says so)."""
    flat = message.strip().replace("\n", " ").replace("\t", "")
    refused_method = _REQUIRE_AUTH_REFUSAL.search(flat) or _HBA_REJECT.search(flat)
    return not refused_method and bool(_AUTH_FAILURE.search(flat))


def connect_failure(dsn: EngineDsn, message: str) -> str:
    """What a failed connection attempt may say in public.

    A failed login is reduced to its category (the server's text would echo the user name); libpq's
    refusal of a weak authentication method is kept, since it names only methods; anything else
    (timeouts, refused connections, TLS) is kept with credentials masked.
    """
    flat = message.strip().replace("\n", " ").replace("\t", "")
    refusal = _REQUIRE_AUTH_REFUSAL.search(flat)
    if refusal:
        return dsn.redact(refusal.group(0))
    if _HBA_REJECT.search(flat):
        return f"the server's pg_hba.conf rejects this client for the user in {dsn.credentials_source}"
    if _AUTH_FAILURE.search(flat):
        return f"authentication failed for the user in {dsn.credentials_source}"
    return dsn.redact(flat)


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
    credentials_source: str | None = None,
    require_auth: str | None = None,
) -> EngineDsn:
    """Turn a user's DSN (key=value or URI) into the engine's conninfo; raise InvalidDsn without echoing it.

    The engine's `statement_timeout`/`lock_timeout` go first in `options`, so an explicit setting in the
    user's own `options` still wins (someone who sets it knows why); `connect_timeout` is added only when
    neither the DSN nor PGCONNECT_TIMEOUT chose one, the TCP keepalive settings only when the DSN has none.

    `require_auth` (a `requireAuth` value: scram-sha-256, md5, password, any) is the controller's: it
    decides. Without it (the CLI, the sidecar) a `require_auth` in the DSN or PGREQUIREAUTH wins, and
    otherwise scram-sha-256 is required whenever there is a password to give away (in the DSN, in
    PGPASSWORD, or in a password file): a listener at that address asking for a weaker method gets none.
    With no password at hand (trust, peer, certificates) nothing changes.
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
    # The idle timeouts: the connection idles between cycles by design, and a server-wide
    # idle_session_timeout shorter than the interval would otherwise kill it before every other cycle.
    ours = (
        f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout={int(lock_timeout_ms)}"
        " -c search_path=pg_catalog,pg_temp -c idle_in_transaction_session_timeout=0"
    )
    user_options = params.get("options")
    params["application_name"] = application_name
    if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
        params["connect_timeout"] = str(int(connect_timeout))
    _choose_require_auth(params, require_auth)
    for key, value in TCP_KEEPALIVES.items():
        params.setdefault(key, value)  # a DSN's own choice stands; libpq ignores them on a Unix socket
    params["options"] = f"{ours} {user_options}" if user_options else ours
    before_14 = pg_conninfo.make_conninfo(**params)  # idle_session_timeout is new in PostgreSQL 14
    ours += f" -c {IDLE_SESSION_TIMEOUT}=0"
    params["options"] = f"{ours} {user_options}" if user_options else ours
    return EngineDsn(
        conninfo=pg_conninfo.make_conninfo(**params),
        conninfo_before_14=before_14,
        target=format_target(params.get("host") or params.get("hostaddr"), params.get("port")),
        password=str(password) if password else None,
        user=str(params["user"]) if params.get("user") else None,
        credentials_source=credentials_source or "the connection string",
    )


def _choose_require_auth(params: dict[str, Any], require_auth: str | None) -> None:
    """Set libpq's `require_auth` (and channel binding when TLS offers it) in `params`; see parse_dsn."""
    if require_auth is not None:
        if require_auth not in REQUIRE_AUTH_METHODS:
            raise InvalidDsn(f"requireAuth must be one of {', '.join(REQUIRE_AUTH_METHODS)}, not {require_auth!r}")
        methods = REQUIRE_AUTH_METHODS[require_auth]
        params.pop("require_auth", None)
        if methods is not None:
            params["require_auth"] = methods
    elif (
        "require_auth" not in params
        and not os.environ.get("PGREQUIREAUTH")
        and _has_password(params)
        and not _unix_socket_only(params)
    ):
        params["require_auth"] = REQUIRE_AUTH_METHODS[REQUIRE_AUTH_DEFAULT]
    params.setdefault("channel_binding", "prefer")  # libpq's default when built with TLS, said explicitly


def _unix_socket_only(params: dict[str, Any]) -> bool:
    """Whether every host libpq would try is a Unix socket (a path, or none: the default socket directory).

    Nobody can stand in for the server on a socket without write access to its directory (in a pod: the
    pod's own shared volume), and local sockets are commonly `trust` or `peer`, which send no password at
    all: requiring SCRAM there would only refuse the sidecar's own server.
    """
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "")
    return all(h == "" or h.startswith(("/", "@")) for h in hosts.split(","))


def _has_password(params: dict[str, Any]) -> bool:
    """Whether libpq would have a password to send: in the DSN, PGPASSWORD, or a password file."""
    if params.get("password") or os.environ.get("PGPASSWORD"):
        return True
    passfile = params.get("passfile") or os.environ.get("PGPASSFILE") or os.path.expanduser("~/.pgpass")
    return os.path.isfile(str(passfile))


async def connect(dsn: EngineDsn | str) -> psycopg.AsyncConnection[Any]:
    """Open the engine's connection; failures become TargetUnreachable with a redacted message."""
    parsed = dsn if isinstance(dsn, EngineDsn) else parse_dsn(dsn)
    try:
        try:
            return await psycopg.AsyncConnection.connect(parsed.conninfo, autocommit=True)
        except psycopg.Error as exc:
            if parsed.conninfo_before_14 is None or f'parameter "{IDLE_SESSION_TIMEOUT}"' not in str(exc):
                raise
            # PostgreSQL 13 or older: it has no idle_session_timeout, so nothing can kill us for idling.
            return await psycopg.AsyncConnection.connect(parsed.conninfo_before_14, autocommit=True)
    except psycopg.Error as exc:
        failure = AuthenticationFailed if is_authentication_failure(str(exc)) else TargetUnreachable
        raise failure(f"cannot connect to {parsed.target}: {connect_failure(parsed, str(exc))}") from None


def target_of(conn: psycopg.AsyncConnection[Any]) -> str:
    """`HOST:PORT` of an open connection, as the server was actually reached."""
    return format_target(conn.info.host, conn.info.port)
