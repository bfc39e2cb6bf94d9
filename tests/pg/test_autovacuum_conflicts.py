"""The autovacuum cap disputed across processes, on real PostgreSQL: two `pgwarden enforce` loops with different
caps, and a DBA's ALTER SYSTEM after pgwarden wrote. Ground truth is the server's log (every ALTER SYSTEM
statement, and which backend sent it) and postgresql.auto.conf itself, not pgwarden's report.

Each test starts a dedicated server (they ALTER SYSTEM it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgwarden.engine.cycle import run_cycle
from tests.fixtures.postgres import PgFactory
from tests.harness.cli import CliLoop
from tests.harness.engine import spec_of
from tests.harness.ledger import ENGINE_APPLICATION, Ledger
from tests.harness.postgres import wait_for
from tests.pg.test_autovacuum import auto_conf_stamp, in_auto_conf, warden

pytestmark = pytest.mark.pg

ALTER = "ALTER SYSTEM SET autovacuum_max_workers"


def alter_systems(ledger: Ledger) -> Counter[int]:
    """ALTER SYSTEM SET autovacuum_max_workers statements sent by engine connections, per backend pid."""
    return Counter(
        e.pid
        for e in ledger.entries()
        if e.application == ENGINE_APPLICATION and e.level == "LOG" and ALTER in e.message
    )


def cap_policy(tmp_path: Path, name: str, cap: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""
apiVersion: pgwarden.dev/v1alpha1
kind: PostgresPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: postgres}}}}
  interval: 1s
  autovacuum: {{maxWorkers: {cap}}}
"""
    )
    return path


@pytest.fixture
def loops() -> Iterator[list[CliLoop]]:
    started: list[CliLoop] = []
    yield started
    for loop in started:
        if loop.proc.poll() is None:
            loop.stop()


def conflicts(loop: CliLoop) -> list[list[str]]:
    """conflictsWith of every report so far that had one."""
    return [r["autovacuum"]["conflictsWith"] for r in loop.poll() if r["autovacuum"]["conflictsWith"]]


def named_pid(conflicts: list[list[str]]) -> int:
    """The other process's backend pid, as the conflict names it ("... (backend pid N) wants V")."""
    names = {name for names in conflicts for name in names}
    assert len(names) == 1, names
    return int(next(iter(names)).split("backend pid ")[1].split(")")[0])


@pytest.mark.parametrize("start", ["one-after-the-other", "together"])
def test_two_cli_loops_with_different_caps_write_at_most_once_each_and_both_report_the_conflict(
    pg_factory: PgFactory, tmp_path: Path, loops: list[CliLoop], start: str
) -> None:
    """Each loop claims its value on the server (a shared advisory lock) and sees the other's: neither writes
    once both claims are up, each names the other, and postgresql.auto.conf is written at most once per side,
    whatever the start order. When one loop stops, its claim goes with its connection: the other reports no
    conflict any more, and writes only if the file does not hold its own value."""
    server = pg_factory(ledger=True)
    ledger = Ledger(server.logfile)
    loops.append(CliLoop(server.dsn(), cap_policy(tmp_path, "cap-two", 2)))
    if start == "one-after-the-other":
        wait_for(lambda: loops[0].poll(), timeout=20, message="the first loop's first report")
        assert loops[0].reports[0]["autovacuum"]["maxWorkers"]["written"]
    loops.append(CliLoop(server.dsn(), cap_policy(tmp_path, "cap-three", 3)))
    two, three = loops

    # Three conflict reports each: both claims are up and have been seen for several cycles.
    wait_for(lambda: len(conflicts(two)) >= 3 and len(conflicts(three)) >= 3, timeout=30, message="both conflicts")
    pid_of_three, pid_of_two = named_pid(conflicts(two)), named_pid(conflicts(three))
    assert conflicts(two)[-1] == [f"another pgwarden process (backend pid {pid_of_three}) wants 3"]
    assert conflicts(three)[-1] == [f"another pgwarden process (backend pid {pid_of_two}) wants 2"]
    written = alter_systems(ledger)
    assert set(written) <= {pid_of_two, pid_of_three}, written
    assert max(written.values(), default=0) <= 1, written
    file_now = in_auto_conf(server)
    assert file_now in ([], ["2"], ["3"])
    if start == "one-after-the-other":
        assert (written, file_now) == (Counter({pid_of_two: 1}), ["2"])
    stamp = auto_conf_stamp(server)
    wait_for(lambda: len(conflicts(two)) >= 6 and len(conflicts(three)) >= 6, timeout=30, message="more cycles")
    assert (alter_systems(ledger), auto_conf_stamp(server)) == (written, stamp)  # nothing written meanwhile

    three.stop()
    seen = len(two.poll())
    wait_for(lambda: len(two.poll()) >= seen + 3, timeout=30, message="three more reports of cap-two")
    last = two.reports[-1]["autovacuum"]
    assert last["conflictsWith"] == []
    assert in_auto_conf(server) == ["2"]  # it went on alone, and wrote only if the file did not hold 2 already
    assert alter_systems(ledger)[pid_of_two] <= 1
    print(f"ALTER SYSTEM per side ({start}): {dict(alter_systems(ledger))}")


async def test_a_dbas_alter_system_after_pgwarden_wrote_is_reported_and_never_overwritten(
    pg_factory: PgFactory,
) -> None:
    """pgwarden remembers what it wrote; a different value in postgresql.auto.conf is someone else's: reported as
    the conflict (naming the value) and left alone, even when the policy's cap changes. Once the file no longer
    holds it (the DBA resets it), the policy writes again, once."""
    server = pg_factory(ledger=True)
    ledger = Ledger(server.logfile)
    target = f"{server.host}:{server.port}"
    # 2, then 1: neither is the default (3 on 15, on 18), so each needs a line in postgresql.auto.conf.
    two, one = spec_of(sessions=[], autovacuum={"maxWorkers": 2}), spec_of(sessions=[], autovacuum={"maxWorkers": 1})
    async with warden(server) as conn:
        first = await run_cycle(conn, two, policy="ns/cap", target=target)
        assert first.autovacuum is not None
        assert first.autovacuum.written
        server.execute("ALTER SYSTEM SET autovacuum_max_workers = 4")  # the DBA, after pgwarden
        server.execute("SELECT pg_reload_conf()")
        stamp = auto_conf_stamp(server)
        for spec in (two, two, one, one):  # the same cap, then a changed one: the DBA's value stays
            report = await run_cycle(conn, spec, policy="ns/cap", target=target)
            assert report.autovacuum is not None
            assert report.autovacuum.conflicts_with == ["postgresql.auto.conf holds 4, not written by pgwarden"]
            assert not report.autovacuum.written
            assert any("postgresql.auto.conf holds 4, which pgwarden did not write" in e for e in report.errors)
        assert (in_auto_conf(server), auto_conf_stamp(server)) == (["4"], stamp)
        server.execute("ALTER SYSTEM RESET autovacuum_max_workers")  # the DBA gives way
        after = await run_cycle(conn, one, policy="ns/cap", target=target)
        again = await run_cycle(conn, one, policy="ns/cap", target=target)
    assert after.autovacuum is not None
    assert again.autovacuum is not None
    assert (after.autovacuum.written, after.autovacuum.conflicts_with) == (True, [])
    assert (again.autovacuum.written, again.autovacuum.conflicts_with) == (False, [])
    assert in_auto_conf(server) == ["1"]
    wait_for(lambda: sum(alter_systems(ledger).values()) == 2, timeout=10, message="two ALTER SYSTEM in the log")
    assert sum(alter_systems(ledger).values()) == 2  # 2 at first, 1 after the reset: one per change, no more
