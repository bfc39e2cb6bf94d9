"""Benchmark: `pgwarden run` over 200 targets against what a cycle physically needs; status writes, Events, RSS.

Starts its own control plane (etcd + kube-apiserver, tests.harness) and a few PostgreSQL servers, each
listening on many 127.0.x.y addresses on one shared port, so 200 Pods with distinct podIPs are reached by
one policy's `connection.port`. Nothing matches any rule. Measured in one run, everything stopped after:
  floor    median wall time of `SELECT count(*) FROM pg_stat_activity` (one read of the view: what a cycle
           physically needs) on every target, on the engine's own connection to it (one backend per target,
           as under the operator), at the operator's concurrency (Runtime's semaphore); interleaved with
  statement the same for the policy's compiled observation statement through bare psycopg: what the rules
           cost the server and the driver, without the engine's Python (engine / statement is that Python)
  engine   the same for one engine cycle of the policy per target (`EngineTarget.evaluate`, what the
           operator's worker calls), so the controller's own share is cycle / engine
  worker   one pass of the controller's PolicyWorker over every target in this process, through the shared
           pool on the same engine connections, status sink a no-op: worker / engine is the worker's own
           Python (selection, scheduling, pool turns, metrics, log context); cycle / worker is the rest of
           the operator's process (status bookkeeping and writer, kopf, the metrics server, threads)
  settle   the first pass's duration (connections included), and when passes are whole again: two passes
           in a row over every target (a first pass longer than the gap splits the ones after it for a while)
  cycle    median wall time of one full cycle of one policy over every target (interval 2s), from the
           operator's pgwarden_policy_pass_duration_seconds: targets that fell due together, from then until
           the last is reported, status bookkeeping included; only passes over every target count; measured
           once passes are whole again
  status   the size of the policy's status (JSON) at the end of the steady-state minute
  writes   changes to the policy object per steady-state minute, from a watch on the API server: status
           writes that said something new, heartbeats (only timestamps and counts moved), anything else
  events   Events about the policy posted in that minute
  RSS      VmRSS of the operator process (/proc): 1 policy x 200 targets; then 20 policies over the same
           200 pods, each pod in one policy (200 targets) and every policy on every pod (4,000 targets)
Targets: cycle / floor <= 1.5; 0 writes and 0 Events per steady-state minute; RSS <= 150 MB.
PGWARDEN_BENCH_PROFILE=DIR runs the operator under cProfile (one DIR/operator-PORT.prof per phase).

    .venv/bin/python bench/operator_cycle.py [--major 15] [--servers 4] [--targets 200] [--minute 60]
    .venv/bin/python bench/operator_cycle.py --targets 1000 --servers 20 --policies 1 --reference-rounds 5
(1,000 targets, about 5 minutes on 2 cores. There the first pass, 1,000 new connections, takes seconds,
longer than the 2s gap: its targets land overdue at different moments and the passes after it are split
until they merge again, which `settle` times. Each reference round is ~1 s of floor and ~1.5 s of engine,
hence 5 rounds.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO)]

from kubernetes import client, watch  # noqa: E402

from pgwarden.enforcement.pool import ConnectionPool  # noqa: E402
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate, differs  # noqa: E402
from pgwarden.enforcement.targets import PodInfo  # noqa: E402
from pgwarden.enforcement.worker import PolicyWorker  # noqa: E402
from pgwarden.engine.observe import compile_observation  # noqa: E402
from pgwarden.engine.session import EngineTarget  # noqa: E402
from pgwarden.logs import configure_logging  # noqa: E402
from pgwarden.policy import parse_spec  # noqa: E402
from pgwarden.policy.api import CREDENTIALS_LABEL, GROUP, PLURAL, VERSION  # noqa: E402
from pgwarden.settings import DEFAULTS  # noqa: E402
from tests.fixtures.operator import apply_crds  # noqa: E402
from tests.harness.controlplane import ControlPlane  # noqa: E402
from tests.harness.credentials import FixedCredentials  # noqa: E402
from tests.harness.k8s import MERGE_PATCH, new_namespace, running_status  # noqa: E402
from tests.harness.pgbinaries import selected_versions  # noqa: E402
from tests.harness.postgres import PgServer, free_port, running_server, wait_for  # noqa: E402

USER, PASSWORD = "warden", "bench-Pa55word"  # throwaway, for servers this script starts and destroys
SECRET = "pg-credentials"  # noqa: S105 - the Secret's name, not a secret


# -- PostgreSQL: a few servers, each on many addresses ---------------------------------------------------
def addresses(servers: int, per_server: int) -> list[list[str]]:
    """Disjoint 127.0.x.y address sets, one per server (127.0.200.1 ... for server 0, and so on)."""
    return [[f"127.0.{200 + s}.{i + 1}" for i in range(per_server)] for s in range(servers)]


MAX_LISTEN = 64
"""PostgreSQL's MAXLISTEN: a server listens on at most 64 sockets (1,000 targets need 16 servers or more)."""


def shared_free_port(hosts: list[str], attempts: int = 20) -> int:
    """A port free on every address: the policy's one `connection.port` must reach every server."""
    for _ in range(attempts):
        port = free_port(hosts[0])
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every address")


def prepare(server: PgServer) -> None:
    """The least-privilege role the operator connects as (as in the e2e tests)."""
    server.create_role(USER, password=PASSWORD, grants=("pg_signal_backend", "pg_read_all_stats"))


def operator_connections(servers: list[PgServer]) -> int:
    return sum(
        int(s.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgwarden%'")[0][0])
        for s in servers
    )


# -- the floor, and the engine alone ----------------------------------------------------------------------
FLOOR_STATEMENT = "SELECT count(*) FROM pg_stat_activity"
"""What any cycle physically needs on a target: one read of the view (a bare SELECT 1 understates it)."""


WARM_ROUNDS = 12
"""Unmeasured rounds first: every statement past psycopg's preparing and PostgreSQL's custom plans."""


@dataclass
class References:
    """Per-round wall times over all targets at the operator's concurrency, connections reused."""

    floor_first: float = 0.0
    floor: list[float] = field(default_factory=list)
    statement: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)

    def medians(self) -> str:
        """Each reference's median so far, for the progress lines (the summary reads the lists itself)."""
        kinds = {"floor": self.floor, "statement": self.statement, "engine": self.engine, "worker": self.worker}
        return ", ".join(f"{kind} {statistics.median(times) * 1000:.1f} ms" for kind, times in kinds.items())


def reference_worker(engines: dict[str, EngineTarget], concurrency: int) -> tuple[PolicyWorker, list[float]]:
    """A PolicyWorker whose pool hands out the given engine connections (no second backend per target) and
    whose status and Events go nowhere, on a clock that `skew` (the returned list) moves forward: adding the
    gap to it makes every target due at once, as a pass of the operator finds them."""
    skew = [0.0]

    async def no_status(
        updates: list[TargetUpdate], owned: list[str], condition: PolicyCondition | None, final: bool
    ) -> None:
        return None

    worker = PolicyWorker(
        namespace="bench",
        name="reference",
        secrets=FixedCredentials(USER, PASSWORD),  # the role every benchmark server has
        make_enforcer=ConnectionPool(connect=lambda endpoint: engines[endpoint.host]).acquire,
        write_status=no_status,
        post_event=lambda event: None,
        concurrency=asyncio.Semaphore(concurrency),
        clock=lambda: time.monotonic() + skew[0],
    )
    return worker, skew


async def reference_rounds(hosts: list[str], port: int, concurrency: int, rounds: int, refs: References) -> None:
    """Interleaved rounds of (a) one read of pg_stat_activity on every target (the floor), (b) the policy's
    compiled observation statement on every target through bare psycopg (what the rules cost the server and the
    driver, without the engine's Python) and (c) one engine cycle of the bench policy on every target through
    `EngineTarget`, what the operator's worker calls (so: the controller's own cost is cycle - engine) and (d)
    one pass of a PolicyWorker over every target (the controller's per-pass Python without kopf). All on
    the engine's own connection to each target: the servers hold one backend per target, as under the operator.
    (Separate floor connections doubled the backends each read walks, and with them the floor's cost: 75
    against 37 ms at 200 targets, a ratio understated by half.)"""
    engines = [
        EngineTarget(host=h, port=port, dbname="postgres", user=USER, password=PASSWORD, sslmode="prefer")
        for h in hosts
    ]
    body = policy("reference", port, "2s", {"app": "pg"})
    body["metadata"].update(namespace="bench", generation=1)
    spec = parse_spec(body["spec"])
    query = compile_observation(spec)
    sem = asyncio.Semaphore(concurrency)
    worker, skew = reference_worker(dict(zip(hosts, engines, strict=True)), concurrency)
    pods = [PodInfo(f"db-{i:04d}", "bench", "Running", h, {"app": "pg"}) for i, h in enumerate(hosts)]

    async def count_activity(i: int) -> None:
        async with sem:
            conn = await engines[i]._session.connection()  # the engine's own backend; connects the first time
            cur = await conn.execute(FLOOR_STATEMENT)
            await cur.fetchall()

    async def observation_statement(i: int) -> None:
        async with sem:
            conn = await engines[i]._session.connection()
            cur = await conn.execute(query.statement, query.params)
            await cur.fetchone()

    async def engine_cycle(i: int) -> None:
        async with sem:
            report, _ = await engines[i].evaluate(spec, policy="bench/reference", target=f"{hosts[i]}:{port}")
            assert not report.actions, report.actions

    async def worker_pass() -> float:
        skew[0] += spec.interval.total_seconds()  # every target due now, as at the start of an operator pass
        started = time.perf_counter()
        await worker.step(body, pods)
        assert len(worker.inflight()) == len(hosts), "a pass over every target"
        await asyncio.gather(*worker.inflight())
        await worker.step(body, pods)  # harvests, as the operator's step that ends a pass
        return time.perf_counter() - started

    async def round_(one: Any) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(hosts))))
        return time.perf_counter() - started

    try:
        first = await round_(count_activity)
        refs.floor_first = refs.floor_first or first
        # psycopg prepares a statement after 5 runs, and PostgreSQL then plans the first 5 runs of it afresh
        # (custom plans: ~1.4 ms of server CPU for the observation against ~0.2 ms once it settles on the generic
        # one); with 5 rounds, 1,000-target runs measured that planning (engine 1.1-1.3 s instead of ~0.4 s).
        for _ in range(WARM_ROUNDS):
            await round_(count_activity)
            await round_(observation_statement)
            await round_(engine_cycle)
            await worker_pass()
        for _ in range(rounds):
            refs.floor.append(await round_(count_activity))
            refs.statement.append(await round_(observation_statement))
            refs.engine.append(await round_(engine_cycle))
            refs.worker.append(await worker_pass())
    finally:
        await worker.close()  # lets go of the pool's handles; the pool closes the engines it was lent
        await asyncio.gather(*(e.close() for e in engines), return_exceptions=True)


# -- Kubernetes objects -----------------------------------------------------------------------------------
def create_pods(api: client.ApiClient, namespace: str, hosts: list[str], shards: int) -> None:
    """Pods db-000... at the given podIPs, labelled app=pg and shard=<i mod shards>, Running (no kubelet)."""
    core = client.CoreV1Api(api)

    def one(i: int, host: str) -> None:
        name = f"db-{i:03d}"
        body = {
            "metadata": {"name": name, "labels": {"app": "pg", "shard": str(i % shards)}},
            "spec": {"containers": [{"name": "postgres", "image": "postgres:18"}]},
        }
        core.create_namespaced_pod(namespace, body)  # type: ignore[arg-type]  # the client takes plain dicts
        core.patch_namespaced_pod_status(
            name, namespace, {"status": running_status(host, "postgres:18")}, _content_type=MERGE_PATCH
        )

    with ThreadPoolExecutor(8) as pool:  # 400 requests; a few at a time is a few seconds, not twenty
        list(pool.map(one, range(len(hosts)), hosts))


def create_secret(api: client.ApiClient, namespace: str) -> None:
    data = {
        "username": base64.b64encode(USER.encode()).decode(),
        "password": base64.b64encode(PASSWORD.encode()).decode(),
    }
    body = {"metadata": {"name": SECRET, "labels": {CREDENTIALS_LABEL: "true"}}, "data": data}
    client.CoreV1Api(api).create_namespaced_secret(namespace, body)  # type: ignore[arg-type]


def policy(name: str, port: int, interval: str, selector: dict[str, str]) -> dict[str, Any]:
    """A policy that matches no session: the rule waits for an application that never connects."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PostgresPolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": selector},
            "connection": {"port": port, "credentialsSecret": {"name": SECRET}},
            "interval": interval,
            "sessions": [
                {
                    "name": "idle",
                    "action": "terminate",
                    "states": ["idle"],
                    "stateAge": "10m",
                    "applicationNames": ["nobody-runs-this"],
                }
            ],
            "exclude": {"users": ["postgres"]},
        },
    }


def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def list_policies(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    listing = custom(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    return list(cast(dict[str, Any], listing)["items"])


def delete_policies(api: client.ApiClient, namespace: str) -> None:
    for item in list_policies(api, namespace):
        custom(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"])

    def gone() -> bool:
        return not list_policies(api, namespace)

    wait_for(gone, timeout=60, interval=0.5, message="policies deleted (finalizers released)")


def policy_events(api: client.ApiClient, namespace: str) -> int:
    """Events about PostgresPolicies in the namespace, counting repeats (`count`) of an aggregated Event."""
    items = client.CoreV1Api(api).list_namespaced_event(namespace).items
    return sum(e.count or 1 for e in items if e.involved_object.kind == "PostgresPolicy")


# -- the operator -----------------------------------------------------------------------------------------
IMAGE_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""What the image's Dockerfile sets for the operator's process (the caller's environment wins): glibc's malloc
otherwise gives each thread that allocates its own arena (8 MB of RSS at 20 policies x 200 pods), and keeps
the space of freed large blocks in its heap once its dynamic mmap threshold has risen (4-7 MB)."""


class Operator:
    """`pgwarden run --namespace NS` as a process, as in production (and in tests/fixtures/operator.py)."""

    def __init__(self, kubeconfig: Path, namespace: str, logdir: Path, snapshot: Path | None = None) -> None:
        """`snapshot`: run under tracemalloc (bench/traced_operator.py); `snapshot_now()` dumps one."""
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.log_path = logdir / f"operator-{self.metrics_port}.log"
        self.snapshot_prefix = snapshot
        self.snapshots = 0
        profile = os.environ.get("PGWARDEN_BENCH_PROFILE")  # a directory: the operator runs under cProfile
        args = [sys.executable]
        if profile:
            args += ["-m", "cProfile", "-o", str(Path(profile) / f"operator-{self.metrics_port}.prof")]
        # As the image runs it: without the development venv's `rich` (see bench/as_image.py).
        args += [str(REPO / "bench" / ("traced_operator.py" if snapshot else "as_image.py"))]
        args += ["run", "--namespace", namespace, "--standalone"]  # one replica, no peering
        args += ["--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port)]
        env = IMAGE_ENV | dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONPATH=str(REPO / "operator"))
        if snapshot:
            env["PGWARDEN_BENCH_SNAPSHOT"] = str(snapshot)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._healthy, timeout=60, interval=0.2, message="operator /healthz")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def metrics(self, *names: str) -> str:
        """The exposition, or only the named metrics (`name[]=`: cheap, so frequent scrapes barely disturb it)."""
        query = "?" + "&".join(f"name[]={n}" for n in names) if names else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics{query}", timeout=10) as resp:
            return str(resp.read().decode())

    def memory(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB: resident now, and the peak so far."""
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if ":" in line
        )
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def snapshot_now(self, timeout: float = 120) -> Path:
        """Have the traced operator dump a tracemalloc snapshot (SIGUSR1), and wait for the file."""
        if self.snapshot_prefix is None:
            raise RuntimeError("the operator is not traced")
        path = Path(f"{self.snapshot_prefix}.{self.snapshots}")
        self.snapshots += 1
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(path.exists, timeout=timeout, interval=0.5, message=f"snapshot {path}")
        return path

    def cpu_seconds(self) -> float:
        """User + system CPU time the operator has used so far (/proc/PID/stat, fields 14 and 15)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def sample(text: str, metric: str, policy_name: str) -> float | None:
    """One policy's sample of `metric` in a Prometheus exposition, or None if absent."""
    match = re.search(rf'^{metric}\{{[^}}]*policy="{re.escape(policy_name)}"[^}}]*\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else None


PASS_METRICS = (
    "pgwarden_policy_pass_duration_seconds_count",
    "pgwarden_policy_pass_duration_seconds_sum",
    "pgwarden_policy_pass_targets",
    "pgwarden_cycle_duration_seconds_count",
)


@dataclass
class Passes:
    """Full-cycle wall times read off the pass histogram by scraping between passes."""

    policy: str
    targets: int
    full: list[float] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)  # "<passes>x<targets of the last>": split or read together
    _count: float = 0.0
    _sum: float = 0.0

    def prime(self, text: str) -> None:
        """Start counting from this scrape (the warm-up passes are not measured)."""
        self._count = sample(text, "pgwarden_policy_pass_duration_seconds_count", self.policy) or 0.0
        self._sum = sample(text, "pgwarden_policy_pass_duration_seconds_sum", self.policy) or 0.0

    def observe(self, text: str) -> int:
        """Account for the passes since the last scrape; returns how many there were."""
        count = sample(text, "pgwarden_policy_pass_duration_seconds_count", self.policy) or 0.0
        total = sample(text, "pgwarden_policy_pass_duration_seconds_sum", self.policy) or 0.0
        last = sample(text, "pgwarden_policy_pass_targets", self.policy) or 0.0
        new = int(count - self._count)
        if new == 1 and last == self.targets:
            self.full.append(total - self._sum)
        elif new > 0:
            self.partial.append(f"{new}x{last:.0f}")
        self._count, self._sum = count, total
        return new


class PolicyWatch:
    """Counts what changes the policy object on the API server while it runs (a watch in a thread)."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, seconds: float) -> None:
        self.material = self.heartbeat = self.other = 0
        self._stop = threading.Event()
        obj = cast(dict[str, Any], custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        self._last = obj
        args = (api, namespace, name, obj, int(seconds) + 10)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def _run(self, api: client.ApiClient, namespace: str, name: str, obj: dict[str, Any], seconds: int) -> None:
        w = watch.Watch()  # type: ignore[no-untyped-call]
        stream = w.stream(  # type: ignore[no-untyped-call]
            custom(api).list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=obj["metadata"]["resourceVersion"],
            timeout_seconds=seconds,  # the thread ends on its own shortly after the window
        )
        for event in stream:
            if self._stop.is_set():
                break
            new: dict[str, Any] = event["object"]
            if event["type"] != "MODIFIED":
                continue
            before, after = self._last.get("status") or {}, new.get("status") or {}
            if before == after:
                self.other += 1  # metadata (kopf's annotations, finalizers) or spec
            elif differs(before, after):
                self.material += 1
            else:
                self.heartbeat += 1
            self._last = new
        w.stop()  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        """Count nothing after now; the thread itself ends with its watch (or the process: it is a daemon)."""
        self._stop.set()


# -- phases -----------------------------------------------------------------------------------------------
@dataclass
class Bench:
    api: client.ApiClient
    kubeconfig: Path
    namespace: str
    port: int
    servers: list[PgServer]
    logdir: Path
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def row(self, what: str, value: str, target: str = "") -> None:
        self.rows.append((what, value, target))
        print(f"  {what:<54} {value:>14}  {target}", flush=True)

    @contextlib.contextmanager
    def operator(self) -> Iterator[Operator]:
        op = Operator(self.kubeconfig, self.namespace, self.logdir)
        try:
            yield op
        finally:
            op.stop()

    def wait_passes(
        self, op: Operator, expected: dict[str, int], passes: int, timeout: float, full: bool = True
    ) -> None:
        """Until every policy completed `passes` passes (the last over all its targets, if `full`)."""

        def done() -> bool:
            text = op.metrics()
            for name, targets in expected.items():
                if (sample(text, "pgwarden_policy_pass_duration_seconds_count", name) or 0) < passes:
                    return False
                if sample(text, "pgwarden_targets", name) != targets:
                    return False
                if full and sample(text, "pgwarden_policy_pass_targets", name) != targets:
                    return False
            return True

        try:
            wait_for(done, timeout=timeout, interval=1.0, message=f"{passes} full passes of {len(expected)} policies")
        except TimeoutError:
            print("\n".join(line for line in op.metrics().splitlines() if "pass" in line or "targets" in line))
            raise

    @staticmethod
    def settle(op: Operator, targets: int, timeout: float) -> tuple[float, float]:
        """(the first pass's duration, seconds from now until two passes in a row were each over every target).

        A first pass that outlasts the gap (1,000 new connections at interval 2s) leaves every target overdue
        as it lands, so the passes after it are split until they merge again; the window is measured after.
        """
        started = time.monotonic()
        first: float | None = None
        seen = whole_in_a_row = 0
        while time.monotonic() - started < timeout:
            text = op.metrics(*PASS_METRICS)
            count = int(sample(text, "pgwarden_policy_pass_duration_seconds_count", "bench") or 0)
            if count > seen:
                if first is None:
                    first = sample(text, "pgwarden_policy_pass_duration_seconds_sum", "bench") or 0.0
                whole = count - seen == 1 and sample(text, "pgwarden_policy_pass_targets", "bench") == targets
                whole_in_a_row = whole_in_a_row + 1 if whole and seen > 0 else 0
                seen = count
                if whole_in_a_row == 2:
                    return first, time.monotonic() - started
            time.sleep(0.1)
        raise TimeoutError(f"passes not whole again within {timeout:.0f} s")

    def one_policy(self, targets: int, interval: str, minute: float) -> tuple[list[float], float]:
        """Phase 1: one policy over every pod; full cycles, writes and Events over a steady-state minute."""
        create = custom(self.api).create_namespaced_custom_object
        with self.operator() as op:
            create(GROUP, VERSION, self.namespace, PLURAL, policy("bench", self.port, interval, {"app": "pg"}))
            first, whole = self.settle(op, targets, timeout=180)
            self.row("first pass (connections included)", f"{first:.1f} s")
            self.row("passes whole from (two full passes in a row)", f"{whole:.1f} s", "after the policy was created")
            self.wait_passes(op, {"bench": targets}, passes=3, timeout=120, full=False)
            time.sleep(5)  # connections opened, first statuses written
            print(f"  warm: {operator_connections(self.servers)} operator connections", flush=True)
            passes = Passes("bench", targets)
            passes.prime(op.metrics(*PASS_METRICS))
            evaluations = sample(op.metrics(*PASS_METRICS), "pgwarden_cycle_duration_seconds_count", "bench") or 0
            events_before = policy_events(self.api, self.namespace)
            watcher = PolicyWatch(self.api, self.namespace, "bench", minute)
            started, cpu = time.monotonic(), op.cpu_seconds()
            while time.monotonic() - started < minute:
                time.sleep(0.5)
                passes.observe(op.metrics(*PASS_METRICS))
            elapsed, cpu = time.monotonic() - started, op.cpu_seconds() - cpu
            watcher.stop()
            events = policy_events(self.api, self.namespace) - events_before
            body = cast(
                dict[str, Any],
                custom(self.api).get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, "bench"),
            )
            status_bytes = len(json.dumps(body.get("status") or {}, separators=(",", ":")))
            rss, hwm = op.memory()
            per_minute = 60.0 / elapsed
            if passes.full:
                deciles = statistics.quantiles(passes.full, n=10) if len(passes.full) > 1 else passes.full * 9
                self.row(
                    "full cycle: median (p10, p90)",
                    f"{statistics.median(passes.full) * 1000:.1f} ms",
                    f"({deciles[0] * 1000:.0f}, {deciles[-1] * 1000:.0f} ms)",
                )
            if passes.full:
                per_pass = cpu / (len(passes.full) + len(passes.partial))
                self.row("operator CPU per cycle (user + system)", f"{per_pass * 1000:.1f} ms", "all threads")
            self.row(
                "passes in the window: full / other",
                f"{len(passes.full)} / {len(passes.partial)}",
                " ".join(passes.partial),
            )
            cycles = sample(op.metrics(*PASS_METRICS), "pgwarden_cycle_duration_seconds_count", "bench") or 0
            self.row("target evaluations in the window, per second", f"{(cycles - evaluations) / elapsed:.0f}")
            self.row("status writes/min: something new", f"{watcher.material * per_minute:.1f}", "target 0")
            self.row("status writes/min: heartbeat (timestamps only)", f"{watcher.heartbeat * per_minute:.1f}")
            self.row("other changes to the policy/min", f"{watcher.other * per_minute:.1f}")
            self.row("Events/min", f"{events * per_minute:.1f}", "target 0")
            self.row(f"status size, {targets} targets", f"{status_bytes / 1024:.1f} KiB", "compacted under 200 KiB")
            self.row(f"RSS, 1 policy x {targets} targets", f"{rss:.0f} MB", f"peak {hwm:.0f} MB")
            delete_policies(self.api, self.namespace)  # while the operator runs: it releases the finalizers
        return passes.full, rss

    def many_policies(self, count: int, targets: int, interval: str, overlap: bool) -> None:
        """Phase 2: `count` policies over the same pods; RSS once every target of every policy was evaluated
        twice on average (passes need not be whole: an overloaded machine splits them, and what is measured
        here is memory)."""
        layout = "every policy on every pod" if overlap else "each pod in one policy"
        pairs = count * targets if overlap else targets
        expected = {f"bench-{k:02d}": targets if overlap else len(range(k, targets, count)) for k in range(count)}
        with self.operator() as op:
            for k, name in enumerate(expected):
                selector = {"app": "pg"} if overlap else {"app": "pg", "shard": str(k)}
                body = policy(name, self.port, interval, selector)
                custom(self.api).create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
            started = time.monotonic()

            def evaluated() -> bool:
                text = op.metrics("pgwarden_cycle_duration_seconds_count")
                done = sum(sample(text, "pgwarden_cycle_duration_seconds_count", name) or 0 for name in expected)
                return done >= 2 * pairs

            wait_for(evaluated, timeout=600, interval=2.0, message=f"{pairs} targets evaluated twice")
            ramp = time.monotonic() - started
            time.sleep(5)
            rss, hwm = op.memory()
            conns = operator_connections(self.servers)
            self.row(
                f"RSS, {count} policies, {layout}",
                f"{rss:.0f} MB",
                f"target <= 150 MB; peak {hwm:.0f} MB; {pairs} targets, {conns} connections, {interval}; "
                f"ramp {ramp:.0f} s",
            )
            delete_policies(self.api, self.namespace)


def summarise(refs: References, cycles: list[float], bench: Bench) -> None:
    floor, engine = statistics.median(refs.floor), statistics.median(refs.engine)
    statement, worker = statistics.median(refs.statement), statistics.median(refs.worker)
    rows = [
        (
            "floor: count(*) of pg_stat_activity on every target",
            f"{floor * 1000:.1f} ms",
            f"median of {len(refs.floor)}",
        ),
        ("floor: first round (connect + count(*))", f"{refs.floor_first * 1000:.1f} ms", ""),
        (
            "observation statement alone (bare psycopg)",
            f"{statement * 1000:.1f} ms",
            f"{statement / floor:.2f} x floor: what the rules cost",
        ),
        (
            "engine alone: one cycle on every target (no kopf)",
            f"{engine * 1000:.1f} ms",
            f"{engine / floor:.2f} x floor, {engine / statement:.2f} x statement",
        ),
        (
            "worker alone: one PolicyWorker pass (no kopf, no status)",
            f"{worker * 1000:.1f} ms",
            f"{worker / floor:.2f} x floor, {worker / engine:.2f} x engine",
        ),
    ]
    if cycles:
        cycle = statistics.median(cycles)
        rows.append(
            ("operator: one full cycle over every target", f"{cycle * 1000:.1f} ms", f"median of {len(cycles)}")
        )
        rows.append(("ratio cycle / floor", f"{cycle / floor:.2f}", "target <= 1.5"))
        rows.append(("ratio cycle / engine alone", f"{cycle / engine:.2f}", "the controller's own share"))
        rows.append(("ratio cycle / worker alone", f"{cycle / worker:.2f}", "the operator's process beyond the worker"))
    print("\nsummary")
    print(f"  {'what':<54} {'value':>14}  note")
    for what, value, note in rows + bench.rows:
        print(f"  {what:<54} {value:>14}  {note}")


def raise_fd_limit(needed: int) -> None:
    """The operator (a child: it inherits the limit) holds one socket per policy and target."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


@dataclass
class World:
    """What a benchmark run stands on: the servers behind the pods' addresses, the control plane, the pods."""

    servers: list[PgServer]
    plane: ControlPlane
    api: client.ApiClient
    namespace: str


def world(
    stack: contextlib.ExitStack, major: str, sets: list[list[str]], port: int, connections: int, shards: int, name: str
) -> World:
    """One server per address set (`connections` each), a control plane, the Secret and the Running pods."""
    servers = []
    for group in sets:
        settings = {"listen_addresses": "'" + ",".join(group) + "'", "max_connections": str(connections)}
        server = stack.enter_context(running_server(major, host=group[0], port=port, hba="password", settings=settings))
        prepare(server)
        servers.append(server)
    plane = stack.enter_context(ControlPlane())
    api = stack.enter_context(plane.api_client())
    apply_crds(api)
    namespace = new_namespace(api, name)
    create_secret(api, namespace)
    create_pods(api, namespace, [h for s in sets for h in s], shards)
    return World(servers, plane, api, namespace)


def run(args: argparse.Namespace, sets: list[list[str]], port: int, logdir: Path) -> None:
    """Servers, control plane, pods; the reference rounds around the one-policy phase; the RSS phases."""
    hosts = [h for s in sets for h in s]
    connections = len(sets[0]) * args.policies + 100  # enough even if every policy had its own connections
    with contextlib.ExitStack() as stack:
        w = world(stack, args.major, sets, port, connections, args.policies, "bench")
        servers, plane, api, namespace = w.servers, w.plane, w.api, w.namespace
        print(f"control plane {plane.server}, namespace {namespace}, {len(hosts)} pods", flush=True)
        bench = Bench(api, plane.kubeconfig, namespace, port, servers, logdir)

        refs = References()
        asyncio.run(reference_rounds(hosts, port, DEFAULTS.concurrency, args.reference_rounds, refs))
        print(f"  medians: {refs.medians()}", flush=True)
        cycles, _ = bench.one_policy(args.targets, args.interval, args.minute)
        asyncio.run(reference_rounds(hosts, port, DEFAULTS.concurrency, args.reference_rounds, refs))
        print(f"  medians again, with the rounds after: {refs.medians()}", flush=True)
        bench.many_policies(args.policies, args.targets, args.rss_interval, overlap=False)
        bench.many_policies(args.policies, args.targets, args.rss_interval, overlap=True)
        summarise(refs, cycles, bench)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--major", default=selected_versions()[0], help="PostgreSQL major (default: first selected)")
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--targets", type=int, default=200, help="pods, spread evenly over the servers")
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--interval", default="2s", help="the one-policy phase's interval (more cycles per minute)")
    parser.add_argument("--rss-interval", default="30s", help="the many-policies phases' interval (CRD default)")
    parser.add_argument("--minute", type=float, default=60.0, help="length of the steady-state window, seconds")
    parser.add_argument(
        "--reference-rounds", type=int, default=20, help="floor, statement and engine rounds, before and after"
    )
    args = parser.parse_args()
    if args.targets % args.servers:
        parser.error("--targets must be a multiple of --servers")
    per_server = args.targets // args.servers
    if per_server > MAX_LISTEN:
        fewest = -(-args.targets // MAX_LISTEN)
        parser.error(f"at most {MAX_LISTEN} addresses per server: use --servers {fewest} or more")
    sets = addresses(args.servers, per_server)
    hosts = [h for s in sets for h in s]
    port = shared_free_port(hosts)
    raise_fd_limit(args.policies * args.targets + 2 * args.targets + 1000)  # and this process's reference rounds
    configure_logging("warning")  # the engine (reference rounds) logs through structlog
    print(f"PostgreSQL {args.major}: {args.servers} servers x {per_server} addresses, port {port}", flush=True)

    logdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    try:
        run(args, sets, port, logdir)
    except BaseException:
        print(f"operator logs kept in {logdir}", file=sys.stderr)
        raise
    shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
