"""Fault injection for the reliability suite (`tests/faults/`): frozen processes, a misbehaving network
and a server that only pretends to be PostgreSQL. This module holds no tests.

Everything here undoes itself: a frozen process is thawed and a relay or impostor is closed when its
`with` block ends, whatever the test did, so a failing test never leaves a stopped postmaster behind
for the next one.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.harness.postgres import PgServer, Session

# -- processes --------------------------------------------------------------------------------------


def postmaster_pid(server: PgServer) -> int:
    """The postmaster's pid, from the first line of `postmaster.pid` in the data directory."""
    return int((server.datadir / "postmaster.pid").read_text().splitlines()[0])


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (PostgreSQL's backends and auxiliary processes), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command may hold spaces and parentheses: fields after the last ')' are fixed.
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def frozen(*pids: int) -> Iterator[None]:
    """SIGSTOP `pids` for the block; SIGCONT them on the way out, always (a stopped server never exits)."""
    stopped = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen_server(server: PgServer) -> Iterator[None]:
    """The whole server stops answering: postmaster first (no new backends), then every child."""
    master = postmaster_pid(server)
    with frozen(master, *children_of(master)):
        yield


def backend_of(server: PgServer, user: str) -> int:
    """The one backend `user` has on `server` (pgwarden's connection, for `frozen`)."""
    rows = server.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s", (user,))
    assert len(rows) == 1, rows
    return int(rows[0][0])


def rename(sessions: list[Session], app: str) -> None:
    """Set the sessions' application_name (what rules match): parked sessions become victims in one go."""
    for session in sessions:
        session.conn.execute("SELECT pg_catalog.set_config('application_name', %s, false)", (app,))


_SERIES = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$", re.MULTILINE)


def metric_total(text: str, name: str, **labels: str) -> int:
    """The sum of a Prometheus counter's series in `text` (an exposition) whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        int(float(m["value"]))
        for m in _SERIES.finditer(text)
        if m["name"] == name and all(w in m["labels"].split(",") for w in wanted)
    )


# -- a TCP relay that can misbehave ---------------------------------------------------------------

RelayMode = Literal["pass", "blackhole", "reset"]


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, as from a crashed host or a stateful firewall."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class Relay:
    """A TCP relay at `host:port` (a fake pod's IP) in front of `upstream`, in one of three modes.

    pass: bytes flow both ways. blackhole: new connections are accepted and never answered, and
    established ones stop forwarding (bytes are read and dropped: the peer's TCP stack sees a live host,
    so only an application-level deadline notices). reset: new and established connections get a RST.
    With `upstream=None` the relay is a pure blackhole, a host that accepts TCP and never speaks.
    """

    host: str
    port: int
    upstream: tuple[str, int] | None = None
    mode: RelayMode = "pass"
    delay: float = 0.0
    """Seconds each chunk waits before it is passed on (a slow network): a round trip costs twice this."""
    accepted: int = 0
    _listener: socket.socket | None = None
    _sockets: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Relay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()
        if self._listener is not None:
            self._listener.close()

    def set_mode(self, mode: RelayMode) -> None:
        """Switch mode; `reset` also resets every established connection at once."""
        self.mode = mode
        if mode == "reset":
            with self._lock:
                sockets, self._sockets = self._sockets, []
            for sock in sockets:
                _reset(sock)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == "reset":
                _reset(client)
                continue
            with self._lock:
                self._sockets.append(client)
            if self.mode == "blackhole" or self.upstream is None:
                continue  # held open, never read, never answered
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._sockets.append(server)
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable:
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if self.mode == "pass":
                    if self.delay:
                        time.sleep(self.delay)
                    dst.sendall(data)
                # blackhole: read and drop, so neither side's TCP stack ever sees a dead peer
            except (OSError, ValueError):
                # One side reset (a server that exited with a query unread answers it with a RST): pass the
                # failure on, as a network would, instead of leaving the other side waiting on a live socket.
                with contextlib.suppress(OSError, ValueError):
                    dst.shutdown(socket.SHUT_RDWR)
                return


# -- a server that only pretends to be PostgreSQL ------------------------------------------------

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5


@dataclass
class Impostor:
    """Listens at `host:port`, answers a StartupMessage with a request for a weak password method, and
    records whether a PasswordMessage ('p') ever arrives: the attack a policy author's own pod could mount.
    """

    host: str
    port: int
    auth_code: int = AUTH_CLEARTEXT
    startups: int = 0
    passwords: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _listener: socket.socket | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> Impostor:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError, ValueError):
                conn.settimeout(5)
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        while True:
            length, code = struct.unpack("!ii", _read_exact(conn, 8))
            _read_exact(conn, length - 8)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                conn.sendall(b"N")  # no TLS, no GSS: the client decides whether to go on in clear text
                continue
            break
        self.startups += 1
        if self.auth_code == AUTH_MD5:
            conn.sendall(b"R" + struct.pack("!ii", 12, AUTH_MD5) + b"salt")
        else:
            conn.sendall(b"R" + struct.pack("!ii", 8, self.auth_code))
        kind = conn.recv(1)
        if kind == b"p":
            (length,) = struct.unpack("!i", _read_exact(conn, 4))
            self.passwords.append(_read_exact(conn, length - 4))
            fields = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
            conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("peer closed the connection")
        data += chunk
    return data


# -- the one line of figures each fault test prints -------------------------------------------------


def report_figures(
    fault: str,
    injected: str,
    *,
    detect_s: float | None = None,
    recover_s: float | None = None,
    wrongly_signalled: int = 0,
    actions_lost: int = 0,
    secrets_exposed: int = 0,
) -> str:
    """Print (and return) the figures line the README's "Reliability" table is built from."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    line = (
        f"FAULT-FIGURES | {fault} | {injected} | detect {seconds(detect_s)} | recover {seconds(recover_s)}"
        f" | wrongly signalled {wrongly_signalled} | actions lost {actions_lost} | secrets exposed {secrets_exposed}"
    )
    print(line)
    return line


class Stopwatch:
    """Seconds since construction (monotonic)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start
