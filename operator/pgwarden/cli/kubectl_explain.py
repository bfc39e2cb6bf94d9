"""`kubectl pgwarden explain`: which sessions each rule of a policy acts on now, and which come next.

A laptop cannot borrow the operator's credentials to run a cycle on a pod, so there are two sources, and
the output names the one used:

- the policy's status (default): a dry-run policy's enforcer records the sessions its last acting cycle
  would have signalled (`lastActions`, `done: false`). That is "now" as of that cycle; the status holds no
  look-ahead, and an enforcing policy's status records what was done, not what would be (refused: use --dsn).
- `--dsn DSN`: the CLI engine, the code `pgwarden enforce --dry-run --once` runs, against the server the
  DSN names, with the policy's spec read from the cluster. It signals nothing and writes nothing: a dry-run
  cycle (the sessions acted on now, and those the blast radius holds back) and one read-only look-ahead
  (`pgwarden.engine.explain`: every other session a rule will select, and when it crosses).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pgwarden.cli.kubectl_status import NO_VALUE, age, table
from pgwarden.engine.connection import parse_dsn
from pgwarden.engine.explain import Crossing, look_ahead
from pgwarden.engine.report import ActionRecord, CycleReport
from pgwarden.engine.session import TargetSession
from pgwarden.policy.model import PolicySpec

SOURCE_STATUS = "status"
SOURCE_DSN = "dsn"
NOW = "now"

HEADERS = ("TARGET", "RULE", "ACTION", "PID", "USER", "APPLICATION", "STATE", "SINCE", "CROSSES")


@dataclass(frozen=True)
class ExplainRow:
    """One session a rule acts on now (crosses_in 0) or will act on once `crosses_in` seconds have passed.

    The session and the rule are an `ActionRecord`, the engine's own record of an action (here never done:
    explain signals nothing); the row adds where and when. Fields a source does not know stay None: the
    status records no state age, a held-back session the look-ahead no longer saw keeps only its pid.
    """

    target: str
    record: ActionRecord
    crosses_at: str
    """RFC 3339 time of the crossing (for `now`: when it was seen past the thresholds)."""
    crosses_in: float
    held_back: str | None = None
    """For a session past a rule now but held back by the blast radius (or not signalable): the skip reason."""

    def to_json(self) -> dict[str, Any]:
        record = self.record
        return {
            "target": self.target,
            "rule": record.rule,
            "action": record.action,
            "pid": record.pid,
            "user": record.user,
            "database": record.database,
            "applicationName": record.application_name,
            "state": record.state,
            "stateAgeSeconds": None if record.state_age_seconds is None else round(record.state_age_seconds, 1),
            "crosses": NOW if self.crosses_in <= 0 else self.crosses_at,
            "crossesAt": self.crosses_at,
            "crossesInSeconds": round(self.crosses_in, 1),
            "heldBack": self.held_back,
        }


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- from a dry-run policy's status ---------------------------------------------------------------------------


def from_status(policy: Mapping[str, Any]) -> list[ExplainRow]:
    """The would-be actions a dry-run policy's status records for each target (its last acting cycle)."""
    out: list[ExplainRow] = []
    for target in (policy.get("status") or {}).get("targets") or []:
        if not isinstance(target, Mapping):
            continue
        when = str(target.get("lastActionTime") or target.get("lastCycleTime") or "")
        for action in target.get("lastActions") or []:
            if isinstance(action, Mapping) and not action.get("done"):
                out.append(_status_row(str(target.get("pod")), when, action))
    return out


def stale_status(policy: Mapping[str, Any]) -> str | None:
    """Why the status may not describe the spec as it is now (it was written for an older generation), or None."""
    observed = (policy.get("status") or {}).get("observedGeneration")
    generation = (policy.get("metadata") or {}).get("generation")
    if observed is None or generation is None or observed == generation:
        return None
    return f"the status was written for generation {observed} of the spec, which is now at {generation}"


def _status_row(pod: str, when: str, action: Mapping[str, Any]) -> ExplainRow:
    record = ActionRecord(
        rule=str(action.get("rule")),
        action=str(action.get("action")),
        pid=int(action.get("pid", 0)),
        user=action.get("user"),
        database=action.get("database"),
        application_name=action.get("applicationName"),
        client_address=action.get("clientAddress"),
        state=action.get("state"),
        state_age_seconds=None,  # the status does not record it
        done=False,
    )
    return ExplainRow(target=pod, record=record, crosses_at=when, crosses_in=0.0)


# -- from a dry-run cycle and a look-ahead against a DSN -----------------------------------------------------


async def run_against_dsn(dsn: str, spec: PolicySpec, policy: str) -> tuple[CycleReport, list[Crossing], datetime]:
    """A dry-run cycle, then the look-ahead, on one connection; the moment the look-ahead was read."""
    session = TargetSession(parse_dsn(dsn))
    try:
        report = await session.run(spec, policy=policy, dry_run_override=True)
        upcoming = await look_ahead(session, spec)
        return report, upcoming, datetime.now(UTC)
    finally:
        await session.close()


def from_cycle(report: CycleReport, upcoming: list[Crossing], seen: datetime, *, next_count: int) -> list[ExplainRow]:
    """What the dry run acts on and holds back now, then the next `next_count` sessions to cross.

    The dry run decides "now" (so the list is exactly what `pgwarden enforce --dry-run` acts on); the
    look-ahead gives the details of held-back sessions and the later crossings. A session the look-ahead
    finds already past a rule but the dry run did not choose crossed between the two reads: it is listed
    as crossing now, as a next cycle would see it.
    """
    by_pid = {c.session.pid: c for c in upcoming}
    now_text = rfc3339(seen)
    rows = [ExplainRow(report.target, a, now_text, 0.0) for a in report.actions]
    decided = {a.pid for a in report.actions}
    for skip in report.skipped:
        crossing = by_pid.get(skip.pid)
        decided.add(skip.pid)
        rows.append(_crossing_row(report.target, crossing, seen, rule=skip.rule, pid=skip.pid, held=skip.reason))
    later = [c for c in upcoming if c.session.pid not in decided]
    rows.extend(_crossing_row(report.target, c, seen) for c in later[: max(0, next_count)])
    return rows


def _crossing_row(
    target: str,
    crossing: Crossing | None,
    seen: datetime,
    *,
    rule: str | None = None,
    pid: int | None = None,
    held: str | None = None,
) -> ExplainRow:
    """A row from the look-ahead; a held-back session it no longer saw keeps only what the skip says."""
    session = crossing.session if crossing is not None else None
    wait = 0.0 if held is not None or crossing is None else crossing.seconds
    record = ActionRecord(
        rule=rule or (crossing.rule if crossing else NO_VALUE),
        action=crossing.action if crossing else NO_VALUE,
        pid=pid if pid is not None else (session.pid if session else 0),
        user=session.user if session else None,
        database=session.database if session else None,
        application_name=session.application_name if session else None,
        client_address=session.client_address if session else None,
        state=session.state if session else None,
        state_age_seconds=session.state_age if session else None,
        done=False,
    )
    return ExplainRow(
        target=target,
        record=record,
        crosses_at=rfc3339(seen + timedelta(seconds=wait)),
        crosses_in=wait,
        held_back=held,
    )


# -- rendering -----------------------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """`45s`, `3m20s`, `2h5m`: how long, to the second."""
    if seconds is None:
        return NO_VALUE
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def crosses_cell(row: ExplainRow, source: str, now: datetime) -> str:
    if row.crosses_in > 0:
        return f"in {duration(row.crosses_in)} ({row.crosses_at})"
    text = NOW if source == SOURCE_DSN else f"{NOW} as of {age(row.crosses_at, now)}"
    return f"{text}, held back: {row.held_back}" if row.held_back else text


def render(rows: Iterable[ExplainRow], source: str, now: datetime | None = None) -> str:
    moment = now or datetime.now(UTC)
    cells = [
        [
            r.target,
            r.record.rule,
            r.record.action,
            str(r.record.pid),
            r.record.user or NO_VALUE,
            r.record.application_name or NO_VALUE,
            r.record.state or NO_VALUE,
            duration(r.record.state_age_seconds),
            crosses_cell(r, source, moment),
        ]
        for r in rows
    ]
    return table(HEADERS, cells)


def explain_dsn(dsn: str, spec: PolicySpec, policy: str, *, next_count: int) -> tuple[CycleReport, list[ExplainRow]]:
    report, upcoming, seen = asyncio.run(run_against_dsn(dsn, spec, policy))
    return report, from_cycle(report, upcoming, seen, next_count=next_count)
