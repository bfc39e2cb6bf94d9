"""The autovacuum worker cap as pure decisions and reports: what to write, which workers to stop. No I/O.

`autovacuum.py` reads the server into the states below, asks these functions what to do and acts; keeping
the decisions here lets unit tests cover cases a real server cannot be pushed into on demand (a worker
vacuuming to prevent wraparound, a value set on the command line, a stale `pending_restart`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SETTING = "autovacuum_max_workers"
WRAPAROUND_MARK = "(to prevent wraparound)"
"""What `pg_stat_activity.query` of an anti-wraparound autovacuum worker contains."""

WriteAhead = Callable[[int], Awaitable[None]]
"""Called with the value just before `ALTER SYSTEM SET` writes it: the caller records, durably, that pgwarden
is writing it (the operator: status `autovacuum.written`), so a crash right after the write still leaves a
record for the release. If it raises, nothing is written."""

MAX_BACKENDS = 262143
"""PostgreSQL's MAX_BACKENDS (2^18 - 1): the server refuses to start if its process slots add up to more."""


@dataclass(frozen=True)
class SettingState:
    """What the server says about autovacuum_max_workers, read before deciding."""

    server_version: int
    """server_version_num, e.g. 150014 or 180006."""
    in_force: int
    context: str
    """pg_settings.context: 'postmaster' up to PostgreSQL 17, 'sighup' from 18."""
    pending_restart: bool
    """pg_settings.pending_restart; may stay true after a removed line until the restart (<= 17)."""
    source: str
    boot_value: int
    worker_slots: int | None = None
    """autovacuum_worker_slots (PostgreSQL 18+), the ceiling of autovacuum_max_workers."""
    other_backends: int = 0
    """max_connections + max_worker_processes + max_wal_senders + 1, for the MAX_BACKENDS check (<= 17)."""
    file_readable: bool = False
    """Whether pg_file_settings could be read (superuser, or SELECT on it and EXECUTE on its function)."""
    file_value: str | None = None
    """The last line for the setting in the configuration files, if readable and present."""
    auto_conf_value: str | None = None
    """The last line for the setting in postgresql.auto.conf (where ALTER SYSTEM writes), if readable and present."""

    @property
    def needs_restart(self) -> bool:
        return self.context == "postmaster"

    @property
    def configured(self) -> int | None:
        """The value the server takes at its next reload (18+) or restart (<= 17), when that can be known."""
        if self.source == "command line":
            return self.in_force  # the command line outranks every configuration file
        if self.file_readable:
            if self.file_value is None:
                return self.boot_value
            return _parse_int(self.file_value)
        if self.needs_restart and self.pending_restart:
            return None  # something differs in the files, and nobody here can read what
        return self.in_force


@dataclass(frozen=True)
class SettingPlan:
    write: bool
    error: str | None = None
    warning: str | None = None


def plan_setting(state: SettingState, desired: int) -> SettingPlan:
    """Whether to ALTER SYSTEM autovacuum_max_workers to `desired`, or why not. Never writes a pending value twice."""
    if state.worker_slots is not None and desired > state.worker_slots:
        return SettingPlan(
            write=False,
            error=(
                f"cannot set {SETTING} to {desired}: it exceeds autovacuum_worker_slots = {state.worker_slots}, "
                f"which needs a restart to raise; {SETTING} left at {state.in_force}"
            ),
        )
    if state.source == "command line":
        if state.in_force == desired:
            return SettingPlan(write=False)
        return SettingPlan(
            write=False,
            error=(
                f"cannot set {SETTING} to {desired}: the server was started with {SETTING} = {state.in_force} on "
                "its command line, which overrides postgresql.auto.conf"
            ),
        )
    if state.needs_restart and state.other_backends + desired > MAX_BACKENDS:
        return SettingPlan(
            write=False,
            error=(
                f"cannot set {SETTING} to {desired}: with max_connections, max_worker_processes and "
                f"max_wal_senders ({state.other_backends} slots with the launcher) the server would need more than "
                f"{MAX_BACKENDS} process slots and refuse to start"
            ),
        )
    configured = state.configured
    if configured is None and state.file_readable:
        return SettingPlan(write=True)  # the files hold something that is not a number: replace it
    if configured is None:
        return SettingPlan(
            write=False,
            warning=(
                f"{SETTING} has a change pending a restart, but its value cannot be read: pg_file_settings needs "
                "superuser, or SELECT on pg_catalog.pg_file_settings and EXECUTE on "
                "pg_catalog.pg_show_all_file_settings(); not writing again"
            ),
        )
    if configured != desired:
        return SettingPlan(write=True)
    if not state.needs_restart and state.in_force != desired:
        return SettingPlan(write=True)  # in the file but not yet reloaded; writing again and reloading is harmless
    return SettingPlan(write=False)


def foreign_value(state: SettingState, desired: int, last_written: int | None) -> str | None:
    """The value in postgresql.auto.conf if someone other than this policy put it there after it wrote, else None.

    Only a policy that has written here (in this process: `last_written`) can tell its own value from another's;
    before its first write any other value is replaced once (a leftover of an earlier run, or the state the
    policy is meant to change). After that, a value that is neither the one it wrote nor the one it wants was
    written by someone else (a DBA, another tool): pgwarden reports it and leaves it, so the two never take
    turns rewriting the file. A file pgwarden cannot read tells nothing (None).
    """
    if last_written is None or not state.file_readable or state.auto_conf_value is None:
        return None
    found = _parse_int(state.auto_conf_value)
    if found in (desired, last_written):
        return None
    return state.auto_conf_value


def pending_value(state: SettingState) -> int | None:
    """The value waiting for a restart, if one is and it can be known."""
    configured = state.configured
    if state.needs_restart and configured is not None and configured != state.in_force:
        return configured
    return None


def is_pending_restart(state: SettingState) -> bool:
    """Whether the value in force will change at the next restart; the flag alone can be stale (<= 17)."""
    if not state.needs_restart:
        return False
    configured = state.configured
    return state.pending_restart if configured is None else configured != state.in_force


# -- workers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """One row of pg_stat_activity with backend_type = 'autovacuum worker'."""

    pid: int
    backend_start: datetime | None
    query: str | None

    @property
    def prevents_wraparound(self) -> bool:
        return self.query is not None and WRAPAROUND_MARK in self.query


@dataclass(frozen=True)
class SkippedWorker:
    pid: int
    reason: str
    """'wraparound' (never stopped), 'query-unknown' (cannot tell), or 'exited' (gone before the signal)."""

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "reason": self.reason}


def choose_workers_to_stop(workers: Sequence[Worker], cap: int) -> tuple[list[Worker], list[SkippedWorker]]:
    """The newest workers above `cap`, passing over (and reporting) any that prevent wraparound.

    A passed-over worker still runs, so it counts towards the cap and an older one is stopped instead.
    """
    excess = len(workers) - cap
    if excess <= 0:
        return [], []
    newest_first = sorted(
        workers,
        key=lambda w: (w.backend_start.timestamp() if w.backend_start else float("-inf"), w.pid),
        reverse=True,
    )
    stop: list[Worker] = []
    skipped: list[SkippedWorker] = []
    for worker in newest_first:
        if len(stop) == excess:
            break
        if worker.prevents_wraparound:
            skipped.append(SkippedWorker(worker.pid, "wraparound"))
        elif not worker.query or worker.query == "<insufficient privilege>":
            skipped.append(SkippedWorker(worker.pid, "query-unknown"))
        else:
            stop.append(worker)
    return stop, skipped


# -- reports ---------------------------------------------------------------------------------------------


@dataclass
class AutovacuumReport:
    """What one cycle found and did about autovacuum; `to_json` is the `autovacuum` object of the report."""

    desired: int | None
    dry_run: bool = False
    in_force: int | None = None
    written: bool = False
    would_write: bool = False
    pending_restart: bool = False
    pending_value: int | None = None
    worker_slots: int | None = None
    running_workers: int | None = None
    """None when the connecting role cannot see autovacuum workers (needs pg_read_all_stats)."""
    cancelled: list[int] = field(default_factory=list)
    would_cancel: list[int] = field(default_factory=list)
    skipped: list[SkippedWorker] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lost: str | None = None
    """The connection broke part way (not in the JSON): what was done until then is still in the report."""
    conflicts_with: list[str] = field(default_factory=list)
    """Who else wants another value on this server (another policy of this process, another pgwarden process,
    or a value in postgresql.auto.conf that pgwarden did not write): this cycle wrote and stopped nothing."""
    missing_privileges: list[str] = field(default_factory=list)
    """Grants the cap needs that the connecting role lacks (the README's list), named as GRANT would name
    them; not in the JSON (the cycle report carries them, typed, and in its `errors`)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "maxWorkers": {
                "desired": self.desired,
                "inForce": self.in_force,
                "written": self.written,
                "pendingRestart": self.pending_restart,
                "pendingValue": self.pending_value,
                "workerSlots": self.worker_slots,
                "wouldWrite": self.would_write,
            },
            "runningWorkers": self.running_workers,
            "cancelled": list(self.cancelled),
            "skipped": [s.to_json() for s in self.skipped],
            "wouldCancel": list(self.would_cancel),
            "dryRun": self.dry_run,
            "conflictsWith": list(self.conflicts_with),
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


@dataclass
class ReleaseReport:
    """What `release_autovacuum` found in postgresql.auto.conf and whether it reset the setting."""

    written: int
    dry_run: bool = False
    outcome: str = "failed"
    """'reset', 'wouldReset', 'absent' (no line: nothing to undo), 'changed' (someone else's value, left alone),
    'unreadable' (cannot tell whose value it is, left alone) or 'failed' (see errors)."""
    found: str | None = None
    """The value postgresql.auto.conf holds for the setting, as written in the file."""
    message: str = ""
    in_force: int | None = None
    pending_restart: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def reset(self) -> bool:
        return self.outcome == "reset"

    def to_json(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "reset": self.reset,
            "outcome": self.outcome,
            "found": self.found,
            "message": self.message,
            "inForce": self.in_force,
            "pendingRestart": self.pending_restart,
            "dryRun": self.dry_run,
            "errors": list(self.errors),
        }


def _parse_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None
