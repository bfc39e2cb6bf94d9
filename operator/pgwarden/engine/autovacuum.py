"""Cap autovacuum workers on one server: set autovacuum_max_workers, stop workers above it, undo it on release.

The setting is `sighup` from PostgreSQL 18 (a reload applies it, up to `autovacuum_worker_slots`) and
`postmaster` before (it waits for a restart, which pgwarden never does itself). Lowering it does not stop
workers already running, hence `cancelExcessWorkers`. Those workers are stopped with `pg_terminate_backend`,
not `pg_cancel_backend`: a cancelled autovacuum worker abandons only its current table and goes on with the
next one in its list, so cancelling does not lower the count; ending the process does, and costs the table
no more than a cancel. Workers vacuuming to prevent wraparound are never stopped.

Decisions are pure functions in `autovacuum_plan`; this module reads the server, acts and verifies.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any, LiteralString

import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row

from pgwarden.engine.autovacuum_claims import CLAIM_LOCK_CLASS
from pgwarden.engine.autovacuum_plan import (
    MAX_BACKENDS,
    SETTING,
    WRAPAROUND_MARK,
    AutovacuumReport,
    ReleaseReport,
    SettingState,
    SkippedWorker,
    Worker,
    WriteAhead,
    choose_workers_to_stop,
    foreign_value,
    is_pending_restart,
    pending_value,
    plan_setting,
)
from pgwarden.policy.model import Autovacuum

__all__ = [
    "AutovacuumReport",
    "ReleaseReport",
    "enforce_autovacuum",
    "hold_claims",
    "other_claims",
    "release_autovacuum",
]

RELOAD_TIMEOUT = 5.0
"""How long to wait for this session to see a reload; pg_reload_conf() only signals the postmaster."""
_POLL_INTERVAL = 0.05

_PRIVILEGES_SQL = """
SELECT current_user AS role,
       r.rolsuper AS superuser,
       has_function_privilege('pg_catalog.pg_reload_conf()', 'EXECUTE') AS reload,
       has_table_privilege('pg_catalog.pg_file_settings', 'SELECT')
         AND has_function_privilege('pg_catalog.pg_show_all_file_settings()', 'EXECUTE') AS read_files,
       pg_has_role('pg_read_all_stats', 'USAGE') AS see_workers
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user
"""
_ALTER_SYSTEM_PRIVILEGE_SQL = "SELECT has_parameter_privilege(%(name)s, 'ALTER SYSTEM') AS ok"  # PostgreSQL 15+
_SIGNAL_ROLE_SQL = "SELECT pg_has_role('pg_signal_autovacuum_worker', 'USAGE') AS ok"  # PostgreSQL 18+

_SETTING_SQL = """
SELECT s.setting::int AS in_force, s.context, s.pending_restart, s.source, s.boot_val::int AS boot_value,
       (SELECT w.setting::int FROM pg_catalog.pg_settings w WHERE w.name = 'autovacuum_worker_slots') AS worker_slots,
       1 + (SELECT sum(o.setting::int) FROM pg_catalog.pg_settings o
             WHERE o.name IN ('max_connections', 'max_worker_processes', 'max_wal_senders'))::int AS other_backends
FROM pg_catalog.pg_settings s
WHERE s.name = %(name)s
"""
# seqno is the order the server read the lines in: the last one wins, and postgresql.auto.conf is read last.
_FILE_SQL = "SELECT sourcefile, setting FROM pg_catalog.pg_file_settings WHERE name = %(name)s ORDER BY seqno"

_WORKERS_SQL = """
SELECT pid, backend_start, query FROM pg_catalog.pg_stat_activity WHERE backend_type = 'autovacuum worker'
"""
# One statement per worker re-checks, at the moment of the signal, that the pid is still the same worker
# (backend_start) and is not now vacuuming to prevent wraparound: a worker moves from table to table.
_STOP_SQL = """
SELECT query,
       CASE WHEN query IS NOT NULL AND strpos(query, %(mark)s) = 0
            THEN pg_catalog.pg_terminate_backend(pid) END AS signalled
FROM pg_catalog.pg_stat_activity
WHERE pid = %(pid)s AND backend_type = 'autovacuum worker' AND backend_start IS NOT DISTINCT FROM %(started)s
"""
_RELOAD_SQL = "SELECT pg_catalog.pg_reload_conf()"
# Claims across processes (see autovacuum_claims): shared, so they never block anyone; `try` so that even an
# exclusive holder of the same key (nobody pgwarden knows) could not make a cycle wait.
_CLAIM_SQL = "SELECT pg_catalog.pg_try_advisory_lock_shared(%(cls)s, %(value)s) AS ok"
_UNCLAIM_SQL = "SELECT pg_catalog.pg_advisory_unlock_shared(%(cls)s, %(value)s) AS ok"
_CLAIMS_SQL = """
SELECT pid, objid::bigint AS value FROM pg_catalog.pg_locks
WHERE locktype = 'advisory' AND classid = %(cls)s::bigint::oid AND objsubid = 2 AND granted
"""
_RESET_SQL = "ALTER SYSTEM RESET autovacuum_max_workers"


class _Privileges:
    """What the connecting role may do here, read once per call."""

    def __init__(self, row: dict[str, Any], server_version: int, alter_system: bool, signal_role: bool) -> None:
        self.role: str = row["role"]
        self.superuser: bool = bool(row["superuser"])
        self.reload: bool = bool(row["reload"])
        self.read_files: bool = bool(row["read_files"])
        self.see_workers: bool = bool(row["see_workers"])
        self.alter_system = alter_system
        self.signal_workers = self.superuser or signal_role
        self.server_version = server_version

    def missing_for_write(self, action: str) -> str | None:
        """Why this role cannot ALTER SYSTEM the setting and reload, naming the grants; None if it can."""
        role = quote_ident(self.role)
        missing = []
        if not self.alter_system:
            if self.server_version >= 150000:
                missing.append(f"GRANT ALTER SYSTEM ON PARAMETER {SETTING} TO {role}")
            else:
                missing.append("SUPERUSER (PostgreSQL 14 and earlier let only superusers ALTER SYSTEM)")
        if not self.reload:
            missing.append(f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_reload_conf() TO {role}")
        if not missing:
            return None
        return (
            f"cannot {action}: role {role} is not a superuser and lacks " + " and ".join(missing) + "; nothing written"
        )

    def missing_for_signal(self, count: int, cap: int) -> str | None:
        if self.signal_workers:
            return None
        role = quote_ident(self.role)
        head = f"cannot stop {count} autovacuum worker(s) above maxWorkers {cap}: role {role} is not a superuser"
        if self.server_version >= 180000:
            return (
                f"{head} and lacks pg_signal_autovacuum_worker (GRANT pg_signal_autovacuum_worker TO {role}); "
                "pg_signal_backend does not cover autovacuum workers"
            )
        return (
            f"{head}, which PostgreSQL {self.server_version // 10000} requires to signal autovacuum workers "
            "(pg_signal_backend does not cover them since the CVE-2023-5870 fixes; PostgreSQL 18 adds the role "
            "pg_signal_autovacuum_worker)"
        )

    def missing_grants(self, *, stop_workers: bool) -> list[str]:
        """Every grant the README lists for the cap that this role lacks, as GRANT names it (empty for a
        superuser); the workers' grants only when the policy stops excess workers."""
        if self.superuser:
            return []
        missing = []
        if not self.alter_system:
            missing.append(f"ALTER SYSTEM ON PARAMETER {SETTING}" if self.server_version >= 150000 else "SUPERUSER")
        if not self.reload:
            missing.append("EXECUTE ON FUNCTION pg_catalog.pg_reload_conf()")
        if not self.read_files:
            missing.append(
                "SELECT ON pg_catalog.pg_file_settings, EXECUTE ON FUNCTION pg_catalog.pg_show_all_file_settings()"
            )
        if stop_workers and not self.see_workers:
            missing.append("pg_read_all_stats")
        if stop_workers and not self.signal_workers:
            missing.append("pg_signal_autovacuum_worker" if self.server_version >= 180000 else "SUPERUSER")
        return list(dict.fromkeys(missing))  # before 15, SUPERUSER is what both writing and stopping need: once

    def missing_for_workers(self) -> str:
        role = quote_ident(self.role)
        return (
            f"cannot see autovacuum workers: role {role} is not a superuser and lacks pg_read_all_stats "
            f"(GRANT pg_read_all_stats TO {role}), so pg_stat_activity hides their backend_type and query"
        )


async def enforce_autovacuum(
    conn: psycopg.AsyncConnection[Any],
    spec: Autovacuum,
    *,
    dry_run: bool,
    before_write: WriteAhead | None = None,
    last_written: int | None = None,
) -> AutovacuumReport:
    """Bring autovacuum_max_workers to `spec.max_workers` and, if asked, stop the workers above it.

    Each part goes on when the other fails; failures land in `errors`. A dry run writes and signals nothing
    and reports what it would do in `would_write` and `would_cancel`. `last_written` is what this policy
    last wrote here: a different value in postgresql.auto.conf is someone else's, reported in
    `conflicts_with` and left alone (see `foreign_value`); then no worker is stopped either.
    """
    report = AutovacuumReport(desired=spec.max_workers, dry_run=dry_run)
    if spec.max_workers is None:
        return report
    desired = _checked_value(spec.max_workers)
    try:
        privileges = await _read_privileges(conn)
    except psycopg.Error as exc:
        _record(conn, exc, report.errors, "reading the connecting role's privileges")
        return report
    report.missing_privileges = privileges.missing_grants(stop_workers=spec.cancel_excess_workers)
    try:
        await _enforce_setting(
            conn, desired, privileges, report, dry_run=dry_run, before_write=before_write, last_written=last_written
        )
        if report.conflicts_with:
            return report  # the cap is disputed: stopping workers to enforce it would take a side
        await _enforce_workers(conn, desired, privileges, report, stop=spec.cancel_excess_workers, dry_run=dry_run)
    except psycopg.Error as exc:  # only a broken connection gets here (see _record)
        # Keep what was written and which workers were stopped before the break: the cycle reports them.
        report.lost = f"connection lost during autovacuum: {str(exc).strip()}"
    return report


async def release_autovacuum(
    conn: psycopg.AsyncConnection[Any], written: int, *, dry_run: bool = False
) -> ReleaseReport:
    """Undo what pgwarden wrote (`ALTER SYSTEM RESET` and reload), only if postgresql.auto.conf still holds `written`.

    Someone else's later value is left alone and reported (`outcome` 'changed'); so is a value this role
    cannot read (`outcome` 'unreadable').
    """
    report = ReleaseReport(written=written, dry_run=dry_run)
    try:
        privileges = await _read_privileges(conn)
        state = await _read_setting_state(conn, read_files=privileges.read_files)
        _fill_release(report, state)
        if not privileges.read_files:
            report.outcome = "unreadable"
            report.message = (
                f"cannot tell whether postgresql.auto.conf still holds the {SETTING} = {written} pgwarden wrote: "
                f"role {quote_ident(privileges.role)} cannot read pg_file_settings (needs superuser, or SELECT on "
                "pg_catalog.pg_file_settings and EXECUTE on pg_catalog.pg_show_all_file_settings()); left alone"
            )
            return report
        found = _auto_conf_value(await _fetch(conn, _FILE_SQL, {"name": SETTING}))
        report.found = found
        if found is None:
            report.outcome = "absent"
            report.message = f"postgresql.auto.conf has no {SETTING} line: nothing to undo"
            return report
        if _as_int(found) != written:
            report.outcome = "changed"
            report.message = (
                f"postgresql.auto.conf holds {SETTING} = {found}, not the {written} pgwarden wrote: "
                "someone else changed it; left alone"
            )
            return report
        missing = privileges.missing_for_write(f"reset {SETTING}")
        if missing:
            report.outcome = "failed"
            report.errors.append(missing)
            return report
        if dry_run:
            report.outcome = "wouldReset"
            report.message = f"would run ALTER SYSTEM RESET {SETTING} and reload"
            return report
        await conn.execute(_RESET_SQL)
        report.outcome = "reset"  # the line is gone from postgresql.auto.conf, whatever the reload does
        report.message = f"ran ALTER SYSTEM RESET {SETTING}"
        after = await _read_setting_state(conn, read_files=True)
        await conn.execute(_RELOAD_SQL)
        state = await _await_reload(conn, after.configured or after.boot_value, read_files=True)
        _fill_release(report, state)
        report.message = f"ran ALTER SYSTEM RESET {SETTING} and reloaded"
    except psycopg.Error as exc:
        if report.outcome != "reset":
            report.outcome = "failed"
        _record(conn, exc, report.errors, f"releasing {SETTING}")
    return report


# -- the setting -----------------------------------------------------------------------------------------


async def _enforce_setting(
    conn: psycopg.AsyncConnection[Any],
    desired: int,
    privileges: _Privileges,
    report: AutovacuumReport,
    *,
    dry_run: bool,
    before_write: WriteAhead | None = None,
    last_written: int | None = None,
) -> None:
    try:
        state = await _read_setting_state(conn, read_files=privileges.read_files)
    except psycopg.Error as exc:
        _record(conn, exc, report.errors, f"reading {SETTING} from pg_settings")
        return
    _fill_setting(report, state)
    plan = plan_setting(state, desired)
    found = foreign_value(state, desired, last_written) if plan.write else None
    if found is not None:
        report.conflicts_with.append(f"postgresql.auto.conf holds {found}, not written by pgwarden")
        report.errors.append(
            f"{SETTING} conflict on this server: postgresql.auto.conf holds {found}, which pgwarden did not write "
            f"(it wrote {last_written}); not overwriting it with {desired} until the policy's cap or the file changes"
        )
        return
    if plan.error:
        report.errors.append(plan.error)
    if plan.warning:
        report.warnings.append(plan.warning)
    if not plan.write:
        return
    missing = privileges.missing_for_write(f"set {SETTING} to {desired}")
    if missing:
        report.errors.append(missing)
        return
    if dry_run:
        report.would_write = True
        return
    if before_write is not None:
        try:
            await before_write(desired)
        except Exception as exc:  # no record, no write: a release must never miss what pgwarden wrote
            report.errors.append(f"not writing {SETTING} = {desired}: recording the write first failed: {exc}")
            return
    try:
        await conn.execute(_alter_system_set(desired))
    except psycopg.Error as exc:
        _record(conn, exc, report.errors, f"ALTER SYSTEM SET {SETTING} = {desired}")
        return
    report.written = True
    try:
        await conn.execute(_RELOAD_SQL)
        state = await _await_reload(conn, desired, read_files=privileges.read_files)
    except psycopg.Error as exc:
        _record(conn, exc, report.errors, f"reloading the configuration after writing {SETTING} = {desired}")
        return
    _fill_setting(report, state)
    if state.in_force == desired:
        return
    if not state.needs_restart:
        report.errors.append(
            f"wrote {SETTING} = {desired} and reloaded, but pg_settings still shows {state.in_force} "
            f"after {RELOAD_TIMEOUT:g}s"
        )
    elif not state.pending_restart:
        report.errors.append(
            f"wrote {SETTING} = {desired} and reloaded, but pg_settings shows neither it in force nor a pending "
            f"restart after {RELOAD_TIMEOUT:g}s"
        )


def _fill_setting(report: AutovacuumReport, state: SettingState) -> None:
    report.in_force = state.in_force
    report.worker_slots = state.worker_slots
    report.pending_restart = is_pending_restart(state)
    report.pending_value = pending_value(state)


def _fill_release(report: ReleaseReport, state: SettingState) -> None:
    report.in_force = state.in_force
    report.pending_restart = is_pending_restart(state)


def _alter_system_set(value: int) -> sql.Composed:
    """ALTER SYSTEM takes no parameters: the value goes in as a literal, checked to be an int in range first."""
    return sql.SQL("ALTER SYSTEM SET autovacuum_max_workers = {}").format(sql.Literal(_checked_value(value)))


def _checked_value(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BACKENDS:
        raise ValueError(f"{SETTING} must be an integer from 1 to {MAX_BACKENDS}, got {value!r}")
    return value


async def _await_reload(conn: psycopg.AsyncConnection[Any], expect: int, *, read_files: bool) -> SettingState:
    """Poll pg_settings until this session has processed the reload, or RELOAD_TIMEOUT passes.

    Processed means `expect` is in force or, for a restart-only setting, a restart shows pending.
    """
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        state = await _read_setting_state(conn, read_files=read_files)
        if state.in_force == expect or (state.needs_restart and state.pending_restart):
            return state
        if time.monotonic() >= deadline:
            return state
        await asyncio.sleep(_POLL_INTERVAL)


async def _read_setting_state(conn: psycopg.AsyncConnection[Any], *, read_files: bool) -> SettingState:
    row = await _fetch_one(conn, _SETTING_SQL, {"name": SETTING})
    if row is None:
        raise RuntimeError(f"pg_settings has no {SETTING}")
    file_value: str | None = None
    auto_conf: str | None = None
    if read_files:
        entries = await _fetch(conn, _FILE_SQL, {"name": SETTING})
        file_value = entries[-1]["setting"] if entries else None
        auto_conf = _auto_conf_value(entries)
    return SettingState(
        server_version=conn.info.server_version,
        in_force=row["in_force"],
        context=row["context"],
        pending_restart=bool(row["pending_restart"]),
        source=row["source"],
        boot_value=row["boot_value"],
        worker_slots=row["worker_slots"],
        other_backends=row["other_backends"] or 0,
        file_readable=read_files,
        file_value=file_value,
        auto_conf_value=auto_conf,
    )


def _auto_conf_value(entries: list[dict[str, Any]]) -> str | None:
    """The last line for the setting in postgresql.auto.conf, where ALTER SYSTEM writes."""
    value: str | None = None
    for entry in entries:
        if (entry["sourcefile"] or "").endswith("/postgresql.auto.conf"):
            value = entry["setting"]
    return value


# -- claims across processes (see autovacuum_claims) --------------------------------------------------

_HELD: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], frozenset[int]] = weakref.WeakKeyDictionary()
"""The claim values each connection holds advisory locks for (the locks go with the connection)."""


async def hold_claims(conn: psycopg.AsyncConnection[Any], values: frozenset[int]) -> None:
    """Make `conn` hold exactly one shared advisory lock per value in `values`; no round trip if it does."""
    held = _HELD.get(conn, frozenset())
    if held == values:
        return
    for value in sorted(values - held):
        await conn.execute(_CLAIM_SQL, {"cls": CLAIM_LOCK_CLASS, "value": value})
    for value in sorted(held - values):
        await conn.execute(_UNCLAIM_SQL, {"cls": CLAIM_LOCK_CLASS, "value": value})
    _HELD[conn] = values


async def other_claims(conn: psycopg.AsyncConnection[Any], own_pids: frozenset[int]) -> dict[int, int]:
    """Backend pid -> claimed value of every session but `own_pids` (this process's) that holds a claim."""
    rows = await _fetch(conn, _CLAIMS_SQL, {"cls": CLAIM_LOCK_CLASS})
    return {int(r["pid"]): int(r["value"]) for r in rows if r["pid"] is not None and r["pid"] not in own_pids}


# -- the workers -----------------------------------------------------------------------------------------


async def _enforce_workers(
    conn: psycopg.AsyncConnection[Any],
    cap: int,
    privileges: _Privileges,
    report: AutovacuumReport,
    *,
    stop: bool,
    dry_run: bool,
) -> None:
    if not privileges.see_workers:
        if stop:
            report.errors.append(privileges.missing_for_workers())
        return
    try:
        rows = await _fetch(conn, _WORKERS_SQL)
    except psycopg.Error as exc:
        _record(conn, exc, report.errors, "listing autovacuum workers in pg_stat_activity")
        return
    workers = [Worker(r["pid"], r["backend_start"], r["query"]) for r in rows]
    report.running_workers = len(workers)
    if not stop:
        return
    chosen, skipped = choose_workers_to_stop(workers, cap)
    report.skipped.extend(skipped)
    if not chosen:
        return
    missing = privileges.missing_for_signal(len(chosen), cap)
    if missing:
        report.errors.append(missing)
        return
    if dry_run:
        report.would_cancel.extend(w.pid for w in chosen)
        return
    for worker in chosen:
        params = {"mark": WRAPAROUND_MARK, "pid": worker.pid, "started": worker.backend_start}
        try:
            row = await _fetch_one(conn, _STOP_SQL, params)
        except errors.InsufficientPrivilege as exc:
            _record(conn, exc, report.errors, f"stopping autovacuum worker {worker.pid}")
            return  # the same role fails the same way on the others
        except psycopg.Error as exc:
            _record(conn, exc, report.errors, f"stopping autovacuum worker {worker.pid}")
            continue
        if row is None or row["signalled"] is False:
            report.skipped.append(SkippedWorker(worker.pid, "exited"))
        elif row["signalled"] is None:
            reason = "wraparound" if WRAPAROUND_MARK in (row["query"] or "") else "query-unknown"
            report.skipped.append(SkippedWorker(worker.pid, reason))
        else:
            report.cancelled.append(worker.pid)


# -- plumbing --------------------------------------------------------------------------------------------


async def _read_privileges(conn: psycopg.AsyncConnection[Any]) -> _Privileges:
    version = conn.info.server_version
    row = await _fetch_one(conn, _PRIVILEGES_SQL)
    if row is None:
        raise RuntimeError("pg_roles has no row for current_user")
    alter_system = bool(row["superuser"])
    if version >= 150000:
        granted = await _fetch_one(conn, _ALTER_SYSTEM_PRIVILEGE_SQL, {"name": SETTING})
        alter_system = bool(granted and granted["ok"])
    signal_role = False
    if version >= 180000:
        member = await _fetch_one(conn, _SIGNAL_ROLE_SQL)
        signal_role = bool(member and member["ok"])
    return _Privileges(row, version, alter_system, signal_role)


async def _fetch(
    conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Rows as dicts whatever row factory the caller's connection has."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def _fetch_one(
    conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    rows = await _fetch(conn, query, params)
    return rows[0] if rows else None


def _record(conn: psycopg.AsyncConnection[Any], exc: psycopg.Error, errors: list[str], doing: str) -> None:
    """Note a failed step and go on, unless the connection itself is gone: then the caller's cycle must know."""
    if conn.broken or conn.closed:
        raise exc
    detail = exc.diag.message_primary or str(exc)
    hint = exc.diag.message_detail
    errors.append(
        f"{doing}: {detail}" + (f" ({hint})" if hint else "") + (f" [{exc.sqlstate}]" if exc.sqlstate else "")
    )


def quote_ident(name: str) -> str:
    """A role name as SQL would need it in a GRANT, for messages a human may paste."""
    return '"' + name.replace('"', '""') + '"'


def _as_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None
