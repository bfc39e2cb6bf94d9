"""The server's own account of who signalled whom: ground truth for tests, independent of pgwarden's report.

A server started with `LEDGER_SETTINGS` logs every statement (with its parameters), every connection and
disconnection, and the line a backend writes when it obeys a signal, each line prefixed with the time
(ms), pid, user and application of the backend that wrote it. `Ledger` reads that log from the moment it
is created and answers: which backends were terminated or had a statement cancelled, and which
`pg_terminate_backend`/`pg_cancel_backend` statements were sent by whom, aimed at which pid.

pgwarden's report is then compared with it: same pids, same count, nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from tests.harness.postgres import wait_for

LEDGER_SETTINGS = {
    "log_connections": "on",
    "log_disconnections": "on",
    "log_line_prefix": "'%m|%p|%u|%a|'",
    "log_statement": "'all'",
}
"""postgresql.conf lines that make the server log what the ledger reads."""

ENGINE_APPLICATION = "pgwarden"
"""The application_name pgwarden's engine connections set (`pgwarden.engine.connection.APPLICATION_NAME`);
a controller replica's are `pgwarden/<identity>`."""


def is_engine_application(application: str) -> bool:
    """Whether a connection's application_name is one of pgwarden's engine connections (CLI, sidecar, or a
    controller replica's `pgwarden/<identity>`)."""
    return application == ENGINE_APPLICATION or application.startswith(ENGINE_APPLICATION + "/")


Action = Literal["terminate", "cancel"]

_LINE = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \S+\|(?P<pid>\d+)\|(?P<user>[^|]*)\|(?P<app>[^|]*)\|"
    r"(?P<level>[A-Z]+):  (?P<message>.*)$"
)
_SIGNAL_CALL = re.compile(r"pg_(terminate|cancel)_backend\(")
_LITERAL_PID = re.compile(r"pg_(?:terminate|cancel)_backend\((\d+)")
_FIRST_PARAM = re.compile(r"\$1 = '(\d+)'")
# The engine's wake-up statement signals several sessions through arrays (pgwarden.engine.observe.WAKE_SIGNALS):
# the pids and the actions are its parameters at these positions of the unnest(...).
_WAKE_UNNEST = re.compile(
    r"unnest\(\$(?P<pids>\d+)::int\[\],\s*\$\d+::timestamptz\[\],\s*\$\d+::timestamptz\[\],\s*"
    r"\$(?P<actions>\d+)::text\[\]\)"
)
_PARAM = re.compile(r"\$(\d+) = (?:'((?:[^']|'')*)'|NULL)")
_TERMINATED = "terminating connection due to administrator command"
_CANCELLED = "canceling statement due to user request"


@dataclass
class Entry:
    """One log message (continuation lines joined), as the backend that wrote it prefixed it."""

    at: datetime
    pid: int
    user: str
    application: str
    level: str
    message: str


@dataclass(frozen=True)
class Signal:
    """A `pg_terminate_backend`/`pg_cancel_backend` statement: who sent it, at which pid, when.

    An attempt, not an effect: pgwarden's guarded statement only signals when the observed backend is
    still there; the effect is the victim's own line (`Ledger.terminated`, `Ledger.cancelled`).
    """

    at: datetime
    by_pid: int
    by_user: str
    by_application: str
    action: Action
    pid: int


@dataclass(frozen=True)
class Effect:
    """A backend obeying a signal, as that backend logged it."""

    at: datetime
    pid: int
    user: str
    application: str
    action: Action


class Ledger:
    """Reads a ledger server's log from the moment of creation (see the module docstring)."""

    def __init__(self, logfile: Path) -> None:
        self.logfile = logfile
        self.start = logfile.stat().st_size if logfile.exists() else 0

    # -- reading ---------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every complete message logged since creation (a trailing partial line is left for later)."""
        with self.logfile.open("rb") as f:
            f.seek(self.start)
            data = f.read()
        text = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
        entries: list[Entry] = []
        for line in text.splitlines():
            match = _LINE.match(line)
            if match is None:
                if entries:  # a continuation line of a multi-line statement
                    entries[-1].message += "\n" + line
                continue
            entries.append(
                Entry(
                    at=datetime.fromisoformat(match["at"]),
                    pid=int(match["pid"]),
                    user=match["user"],
                    application=match["app"],
                    level=match["level"],
                    message=match["message"],
                )
            )
        return entries

    def signals(self) -> list[Signal]:
        """Every signalling statement since creation, in log order."""
        entries = self.entries()
        found: list[Signal] = []
        for index, entry in enumerate(entries):
            if entry.level != "LOG" or not entry.message.startswith(("statement: ", "execute ")):
                continue
            call = _SIGNAL_CALL.search(entry.message)
            if call is None:
                continue
            wake = _WAKE_UNNEST.search(entry.message)
            if wake is not None:
                found.extend(self._wake_signals(entry, wake, entries[index + 1 : index + 4]))
                continue
            action: Action = "terminate" if call.group(1) == "terminate" else "cancel"
            target = self._target_pid(entry, entries[index + 1 : index + 4])
            if target is None:
                continue
            found.append(Signal(entry.at, entry.pid, entry.user, entry.application, action, target))
        return found

    @staticmethod
    def _parameters(statement: Entry, following: list[Entry]) -> dict[int, str]:
        for entry in following:
            if (
                entry.pid == statement.pid
                and entry.level == "DETAIL"
                and entry.message.lower().startswith("parameters:")
            ):
                return {int(n): v.replace("''", "'") for n, v in _PARAM.findall(entry.message)}
        return {}

    @classmethod
    def _wake_signals(cls, statement: Entry, wake: re.Match[str], following: list[Entry]) -> list[Signal]:
        """One Signal per session the wake-up statement was asked to signal (an attempt: its guard decides)."""
        params = cls._parameters(statement, following)
        pids = (params.get(int(wake["pids"])) or "{}").strip("{}")
        actions = (params.get(int(wake["actions"])) or "{}").strip("{}")
        out = []
        for pid, action in zip(pids.split(",") if pids else [], actions.split(",") if actions else [], strict=True):
            kind: Action = "terminate" if action == "terminate" else "cancel"
            out.append(Signal(statement.at, statement.pid, statement.user, statement.application, kind, int(pid)))
        return out

    @staticmethod
    def _target_pid(statement: Entry, following: list[Entry]) -> int | None:
        """The pid a statement aims at: a literal argument, else its first parameter (pgwarden's guard)."""
        literal = _LITERAL_PID.search(statement.message)
        if literal is not None:
            return int(literal.group(1))
        for entry in following:
            if (
                entry.pid == statement.pid
                and entry.level == "DETAIL"
                and entry.message.lower().startswith("parameters:")
            ):
                param = _FIRST_PARAM.search(entry.message)
                return int(param.group(1)) if param else None
        return None

    def effects(self) -> list[Effect]:
        """Every backend that obeyed a terminate or cancel since creation, in log order."""
        out: list[Effect] = []
        for entry in self.entries():
            if entry.level == "FATAL" and entry.message.startswith(_TERMINATED):
                out.append(Effect(entry.at, entry.pid, entry.user, entry.application, "terminate"))
            elif entry.level == "ERROR" and entry.message.startswith(_CANCELLED):
                out.append(Effect(entry.at, entry.pid, entry.user, entry.application, "cancel"))
        return out

    # -- questions tests ask ---------------------------------------------------------------------------
    def terminated(self) -> list[int]:
        """Pids of backends terminated by a signal, once each per termination (a list: duplicates show)."""
        return [e.pid for e in self.effects() if e.action == "terminate"]

    def cancelled(self) -> list[int]:
        return [e.pid for e in self.effects() if e.action == "cancel"]

    def engine_signals(self, application: str | None = None) -> list[Signal]:
        """Signalling statements sent by pgwarden's engine connections (application_name exactly `application`,
        or by default any engine connection: see `is_engine_application`)."""
        if application is None:
            return [s for s in self.signals() if is_engine_application(s.by_application)]
        return [s for s in self.signals() if s.by_application == application]

    def disconnected(self) -> set[int]:
        return {e.pid for e in self.entries() if e.level == "LOG" and e.message.startswith("disconnection:")}

    def wait_effects(self, pids: Iterable[int], *, action: Action = "terminate", timeout: float = 10.0) -> None:
        """Poll until every pid in `pids` has logged obeying `action` (the log is written asynchronously)."""
        wanted = set(pids)

        def logged() -> bool:
            return wanted <= {e.pid for e in self.effects() if e.action == action}

        wait_for(logged, timeout=timeout, message=f"the server log to show {action} of {sorted(wanted)}")

    def assert_agrees(
        self, reported: Iterable[int], *, action: Action = "terminate", engine_pids: Iterable[int] | None = None
    ) -> None:
        """The server log shows exactly the `reported` pids signalled with `action`: same pids, same count.

        Waits for the reported ones to show, then checks nothing else did, and that every one was aimed
        at by an engine statement (by `engine_pids` when given, else any connection named pgwarden).
        """
        pids = list(reported)
        self.wait_effects(pids, action=action)
        if action == "terminate":
            self.wait_disconnected(pids)
        logged = [e.pid for e in self.effects() if e.action == action]
        assert sorted(logged) == sorted(pids), f"server log {action}: {sorted(logged)}, report: {sorted(pids)}"
        senders = set(engine_pids) if engine_pids is not None else None
        aimed = {
            s.pid
            for s in self.signals()
            if s.action == action
            and (s.by_pid in senders if senders is not None else is_engine_application(s.by_application))
        }
        assert set(pids) <= aimed, f"{sorted(set(pids) - aimed)} {action}d but no engine statement aimed at them"

    def wait_disconnected(self, pids: Iterable[int], timeout: float = 10.0) -> None:
        wanted = set(pids)
        wait_for(lambda: wanted <= self.disconnected(), timeout=timeout, message=f"disconnection of {sorted(wanted)}")
