"""Throwaway PostgreSQL clusters for tests: initdb into a temp dir, a free port, stop and delete after.

PostgreSQL refuses to run as root; when the harness is root it runs the server as the `postgres`
system user. Servers listen on one 127.0.0.0/8 address each, so several can pose as distinct pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg

from tests.harness.pgbinaries import bindir

SessionState = Literal["idle", "idle in transaction", "idle in transaction (aborted)", "active"]
HbaMode = Literal["trust", "password"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at `host` right now (bind to 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], Any], *, within: float = 10.0, interval: float = 0.01, message: str = "condition"
) -> Any:
    """`wait_for` inside an event loop: polls without blocking the tasks the predicate waits on."""
    timeout = within
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def holds_for(predicate: Callable[[], Any], duration: float, interval: float = 0.2) -> bool:
    """True if `predicate` stays truthy for `duration` seconds: proof that something does NOT happen."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class Session:
    """A client session held open by a test, in a known state."""

    pid: int
    conn: psycopg.Connection[Any]
    user: str
    database: str
    application_name: str

    def close(self) -> None:
        """Cancel whatever runs (a backend in pg_sleep never notices a closed socket), then disconnect."""
        if self.conn.closed:
            return
        with contextlib.suppress(Exception):
            self.conn.cancel_safe(timeout=5)
        with contextlib.suppress(Exception):
            self.conn.close()


@dataclass
class PgServer:
    """One running PostgreSQL cluster the test suite started and owns."""

    major: str
    host: str
    port: int
    basedir: Path
    hba: HbaMode = "trust"
    settings: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the server processes (e.g. libfaketime's, to step the server's clock)."""
    sessions: list[Session] = field(default_factory=list)

    @property
    def bindir(self) -> Path:
        return bindir(self.major)

    @property
    def datadir(self) -> Path:
        return self.basedir / "data"

    @property
    def logfile(self) -> Path:
        """The server's log (pg_ctl -l): what `tests.harness.ledger.Ledger` reads."""
        return self.basedir / "server.log"

    @property
    def socket_dir(self) -> Path:
        return self.basedir / "sock"

    @property
    def version_num(self) -> int:
        with self.connect() as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None
        return int(row[0])

    def dsn(
        self,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        via_socket: bool = False,
        **extra: str,
    ) -> str:
        """A libpq DSN for this server: TCP on its address by default, or its Unix socket."""
        host = str(self.socket_dir) if via_socket else self.host
        parts = {"host": host, "port": str(self.port), "user": user, "dbname": dbname, **extra}
        if password is not None:
            parts["password"] = password
        return psycopg.conninfo.make_conninfo(**parts)

    def connect(
        self,
        user: str = "postgres",
        dbname: str = "postgres",
        application_name: str = "pgwarden-test",
        autocommit: bool = True,
        password: str | None = None,
    ) -> psycopg.Connection[Any]:
        """A connection over the Unix socket (trusted), for the test's own set-up and checks."""
        return psycopg.connect(
            self.dsn(user, dbname, password, via_socket=password is None, application_name=application_name),
            autocommit=autocommit,
        )

    def execute(
        self, query: str, params: tuple[Any, ...] | dict[str, Any] | None = None, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser and return its rows (empty for commands)."""
        with self.connect(dbname=dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    # -- lifecycle -----------------------------------------------------------------------------------
    def init(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.basedir, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        hba = ["local all all trust"]
        if self.hba == "trust":
            hba.append("host all all 127.0.0.0/8 trust")
        else:
            hba.append("host all all 127.0.0.0/8 scram-sha-256")
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            "password_encryption": "'scram-sha-256'",
            **self.settings,
        }
        with (self.datadir / "postgresql.conf").open("a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def start(self) -> None:
        subprocess.run(
            _as_postgres(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def restart(self) -> None:
        self.close_sessions()
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.close_sessions()
        self.stop("immediate")
        shutil.rmtree(self.basedir, ignore_errors=True)

    # -- objects and sessions --------------------------------------------------------------------------
    def create_role(
        self, name: str, *, password: str | None = None, superuser: bool = False, grants: tuple[str, ...] = ()
    ) -> None:
        """Create a login role; `name` may be any string (quoted as an identifier)."""
        from psycopg import sql

        with self.connect() as conn:
            stmt = sql.SQL("CREATE ROLE {} LOGIN {}").format(
                sql.Identifier(name), sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER")
            )
            conn.execute(stmt)
            if password is not None:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
            for grant in grants:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant), sql.Identifier(name)))

    def create_database(self, name: str, owner: str = "postgres") -> None:
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner)))

    def open_session(
        self,
        state: SessionState = "idle",
        *,
        user: str = "postgres",
        dbname: str = "postgres",
        application_name: str = "test-app",
        sleep_seconds: int = 600,
        password: str | None = None,
        via_socket: bool = False,
    ) -> Session:
        """Open a client session over TCP and bring it into `state`; returns once the server shows it so."""
        conn = psycopg.connect(
            self.dsn(user, dbname, password, via_socket=via_socket, application_name=application_name),
            autocommit=(state in ("idle", "active")),
        )
        if state == "idle" or state == "idle in transaction":
            conn.execute("SELECT 1")
        elif state == "idle in transaction (aborted)":
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
        elif state == "active":
            # Send without waiting for the result: the session stays active while the test goes on.
            conn.pgconn.send_query(f"SELECT pg_sleep({int(sleep_seconds)})".encode())
        pid = conn.info.backend_pid
        session = Session(pid, conn, user, dbname, application_name)
        self.sessions.append(session)
        wait_for(lambda: self.state_of(pid) == state, message=f"session {pid} to be {state!r}")
        return session

    def state_of(self, pid: int) -> str | None:
        """The pg_stat_activity state of `pid`, or None once the backend is gone."""
        rows = self.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        return rows[0][0] if rows else None

    def alive(self, pid: int) -> bool:
        return bool(self.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)))

    def wait_gone(self, pid: int, timeout: float = 10.0) -> None:
        wait_for(lambda: not self.alive(pid), timeout=timeout, message=f"backend {pid} to exit")

    def close_sessions(self) -> None:
        for session in self.sessions:
            session.close()
        self.sessions.clear()


@contextlib.contextmanager
def running_server(
    major: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    hba: HbaMode = "trust",
    settings: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[PgServer]:
    """Start a fresh cluster and always destroy it afterwards."""
    basedir = Path(tempfile.mkdtemp(prefix=f"pgwarden-pg{major}-"))
    basedir.chmod(0o755)
    server = PgServer(
        major=major,
        host=host,
        port=port or free_port(host),
        basedir=basedir,
        hba=hba,
        settings=dict(settings or {}),
        env=dict(env or {}),
    )
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()
