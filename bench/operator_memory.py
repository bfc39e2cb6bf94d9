"""Where the operator's memory goes: imports, then what 20 policies x 200 pods (4,000 targets) add, by component.

Three measurements, one run (the control plane, servers and pods as in bench/operator_cycle.py):
  imports   VmRSS of a fresh interpreter after each of the operator's imports in turn (pgwarden's CLI,
            pydantic, psycopg, prometheus_client, aiohttp, kubernetes, kopf, the controller): the floor no
            policy can go below
  operator  VmRSS of `pgwarden run` (untraced) with 0 policies, then with `--policies` policies each on every
            pod, once every target was evaluated twice
  traced    the same operator under tracemalloc (bench/traced_operator.py), started at 0 policies: what
            the policies' allocations still hold once every target was evaluated twice, by component (the
            package of the innermost frame that is not the standard library: prometheus_client, psycopg,
            kopf, kubernetes, pgwarden/<layer>, ...) and by the innermost pgwarden line behind the
            allocation; plus objects by type (gc)
Targets: RSS <= 150 MB at 20 policies x 200 pods.

    .venv/bin/python bench/operator_memory.py [--major 15] [--servers 4] [--targets 200] [--policies 20]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO), str(REPO / "bench")]

from operator_cycle import (  # noqa: E402
    Operator,
    addresses,
    custom,
    delete_policies,
    operator_connections,
    policy,
    raise_fd_limit,
    sample,
    shared_free_port,
    world,
)

from pgwarden.policy.api import GROUP, PLURAL, VERSION  # noqa: E402
from tests.harness.pgbinaries import selected_versions  # noqa: E402
from tests.harness.postgres import wait_for  # noqa: E402

IMPORTS = (
    ("python itself", ""),
    ("pgwarden CLI (argparse, structlog, settings)", "import pgwarden.cli"),
    ("pydantic + the policy model", "import pgwarden.policy"),
    ("psycopg + the engine", "import pgwarden.engine.session"),
    ("prometheus_client", "import prometheus_client"),
    ("aiohttp", "import aiohttp"),
    ("kubernetes client", "import kubernetes.client, kubernetes.config"),
    ("kopf", "import kopf"),
    ("the controller (enforcement, handlers)", "import pgwarden.controller.app"),
)

IMPORT_PROBE = """
import sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
for stmt in sys.argv[1:]:
    exec(stmt)
    print(rss(), flush=True)
"""


def import_costs() -> list[tuple[str, float, float]]:
    """(what, RSS after it, RSS it added) for each import in turn, in a fresh interpreter."""
    env = {"PYTHONPATH": str(REPO / "operator"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, *(stmt or "pass" for _, stmt in IMPORTS)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    rows, before = [], 0.0
    for (what, _), value in zip(IMPORTS, out, strict=True):
        rss = float(value)
        rows.append((what, rss, rss - before))
        before = rss
    return rows


# -- attributing traced allocations ----------------------------------------------------------------------
STDLIB = sysconfig.get_paths()["stdlib"]


def component(filename: str) -> str | None:
    """`pgwarden/<layer>`, a third-party package's name, or None for the standard library / frozen code."""
    if "/pgwarden/" in filename:
        parts = filename.split("/pgwarden/", 1)[1].split("/")
        return "pgwarden/" + (parts[0] if len(parts) > 1 else parts[0].removesuffix(".py"))
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/")[0].removesuffix(".py")
    return None


def attribute(frames: tracemalloc.Traceback) -> tuple[str, str]:
    """(component, innermost pgwarden line) of one allocation; frames are oldest first."""
    owner = ours = None
    for frame in reversed(frames):  # innermost first
        name = component(frame.filename)
        if name is not None and owner is None:
            owner = name
        if name is not None and name.startswith("pgwarden/") and ours is None:
            ours = f"{frame.filename.split('/pgwarden/', 1)[1]}:{frame.lineno}"
        if owner is not None and ours is not None:
            break
    innermost = frames[-1].filename.rsplit("/", 1)[-1] if len(frames) else "?"
    return owner or f"stdlib/interpreter ({innermost})", ours or "(no pgwarden frame)"


def by_owner(snapshot: tracemalloc.Snapshot) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Bytes by component and by innermost pgwarden line."""
    owners: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    for trace in snapshot.traces:
        owner, ours = attribute(trace.traceback)
        owners[owner] += trace.size
        lines[ours] += trace.size
    return owners, lines


def table(title: str, before: collections.Counter[str], after: collections.Counter[str], top: int) -> None:
    print(f"\n{title}")
    print(f"  {'':<62} {'0 policies':>10} {'policies':>10} {'grew':>9}")
    keys = sorted(before.keys() | after.keys(), key=lambda k: after[k] - before[k], reverse=True)
    for key in keys[:top]:
        grew = (after[key] - before[key]) / 2**20
        print(f"  {key[:62]:<62} {before[key] / 2**20:>7.2f} MB {after[key] / 2**20:>7.2f} MB {grew:>+6.2f} MB")
    print(f"  {'total traced':<62} {sum(before.values()) / 2**20:>7.2f} MB {sum(after.values()) / 2**20:>7.2f} MB")


def types_table(before: Path, after: Path, top: int = 25) -> None:
    """Objects the collector tracks, by type: count and shallow size growth."""
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    print("\nobjects by type (gc-tracked, shallow sys.getsizeof), largest growth first")
    print(f"  {'':<62} {'count':>9} {'grew by':>9} {'bytes':>9}")
    growth = sorted(new, key=lambda k: new[k][1] - old.get(k, [0, 0])[1], reverse=True)
    for name in growth[:top]:
        count, size = new[name]
        was = old.get(name, [0, 0])
        print(f"  {name[:62]:<62} {count:>9} {count - was[0]:>+9} {(size - was[1]) / 2**20:>+7.2f} MB")


# -- the run ----------------------------------------------------------------------------------------------
def settle(op: Operator, names: list[str], pairs: int) -> float:
    """Seconds until every target of every policy was evaluated twice (the RSS phase's rule)."""
    started = time.monotonic()

    def evaluated() -> bool:
        text = op.metrics("pgwarden_cycle_duration_seconds_count")
        return sum(sample(text, "pgwarden_cycle_duration_seconds_count", n) or 0 for n in names) >= 2 * pairs

    wait_for(evaluated, timeout=900, interval=2.0, message=f"{pairs} targets evaluated twice")
    time.sleep(5)
    return time.monotonic() - started


def phase(
    args: argparse.Namespace,
    kubeconfig: Path,
    api: object,
    namespace: str,
    port: int,
    logdir: Path,
    snapshot: Path | None,
) -> tuple[float, float, float, list[Path]]:
    """(RSS at 0 policies, RSS with the policies, peak) and the snapshots, if traced."""
    names = [f"mem-{k:02d}" for k in range(args.policies)]
    op = Operator(kubeconfig, namespace, logdir, snapshot=snapshot)
    shots = []
    try:
        time.sleep(10)  # kopf's watches started, nothing to do
        idle, _ = op.memory()
        if snapshot:
            shots.append(op.snapshot_now())
        for name in names:
            body = policy(name, port, args.interval, {"app": "pg"})
            custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)  # type: ignore[arg-type]
        ramp = settle(op, names, args.policies * args.targets)
        rss, hwm = op.memory()
        print(
            f"  {'traced' if snapshot else 'untraced'}: 0 policies {idle:.0f} MB; {args.policies} x {args.targets}: "
            f"{rss:.0f} MB (peak {hwm:.0f}), ramp {ramp:.0f} s",
            flush=True,
        )
        if snapshot:
            shots.append(op.snapshot_now())
        delete_policies(api, namespace)  # type: ignore[arg-type]
    finally:
        op.stop()
    return idle, rss, hwm, shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--major", default=selected_versions()[0])
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--interval", default="30s")
    parser.add_argument("--no-trace", action="store_true", help="skip the traced operator (it is slow)")
    args = parser.parse_args()

    print("imports (fresh interpreter, VmRSS after each)")
    for what, rss, added in import_costs():
        print(f"  {what:<54} {rss:>7.1f} MB  {added:+6.1f} MB", flush=True)

    per_server = args.targets // args.servers
    sets = addresses(args.servers, per_server)
    hosts = [h for s in sets for h in s]
    port = shared_free_port(hosts)
    raise_fd_limit(args.policies * args.targets + 1000)
    logdir = Path(tempfile.mkdtemp(prefix="pgwarden-memory-"))
    with contextlib.ExitStack() as stack:
        w = world(stack, args.major, sets, port, per_server + 100, args.policies, "memory")
        servers, plane, api, namespace = w.servers, w.plane, w.api, w.namespace
        print(f"\n{len(hosts)} pods, {args.policies} policies each on every pod", flush=True)
        idle, rss, hwm, _ = phase(args, plane.kubeconfig, api, namespace, port, logdir, None)
        print(f"  operator connections during the run: {operator_connections(servers)} (after deletion)")
        rows = [
            ("operator RSS, 0 policies", f"{idle:.0f} MB", ""),
            (
                f"operator RSS, {args.policies} policies x {args.targets} pods",
                f"{rss:.0f} MB",
                f"target <= 150 MB; peak {hwm:.0f} MB",
            ),
            ("  of which the policies' targets (RSS growth)", f"{rss - idle:.0f} MB", ""),
        ]
        if not args.no_trace:
            _, _, _, shots = phase(args, plane.kubeconfig, api, namespace, port, logdir, logdir / "snapshot")
            before = tracemalloc.Snapshot.load(str(shots[0]))
            after = tracemalloc.Snapshot.load(str(shots[1]))
            owners0, lines0 = by_owner(before)
            owners1, lines1 = by_owner(after)
            table("traced Python memory by component (innermost non-stdlib frame)", owners0, owners1, 20)
            table("traced Python memory by the innermost pgwarden line behind it", lines0, lines1, 25)
            types_table(Path(f"{shots[0]}.types.json"), Path(f"{shots[1]}.types.json"))
    print("\nsummary")
    for what, value, note in rows:
        print(f"  {what:<54} {value:>10}  {note}")
    shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
