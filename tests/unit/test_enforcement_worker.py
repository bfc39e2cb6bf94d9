"""The controller's core without a cluster or a server: PolicyWorker scheduling, backoff and reporting.

A fake TargetEnforcer returns real CycleReports (or raises), the status and Event sinks record what they
are given, and the worker's clock is stepped by hand, so every timing rule is checked exactly and fast.
The same worker runs in the controller and the sidecar; tests/e2e prove it against real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pgwarden.enforcement import metrics
from pgwarden.enforcement.events import PolicyEvent
from pgwarden.enforcement.kube import Credentials, CredentialsError, PodMoved
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate
from pgwarden.enforcement.targets import PodInfo
from pgwarden.enforcement.worker import Endpoint, PolicyWorker, TargetEnforcer
from pgwarden.engine.autovacuum_claims import CLAIMS
from pgwarden.engine.autovacuum_plan import ReleaseReport, WriteAhead
from pgwarden.engine.errors import AuthenticationFailed, CycleInterrupted, TargetUnreachable
from pgwarden.engine.report import CycleReport, SkipRecord
from pgwarden.engine.types import ServerCheck
from pgwarden.policy import CredentialsSecret, PolicySpec, parse_spec
from pgwarden.policy.api import (
    ENFORCER_ANNOTATION,
    ConditionReason,
    ConditionType,
    EnforcerKind,
    EventReason,
    SkipReason,
)
from pgwarden.settings import DEFAULTS
from tests.harness.reports import action, cycle_report

MIN_DELAY, IDLE_POLL, WAKE_FLOOR = DEFAULTS.min_delay, DEFAULTS.idle_poll, DEFAULTS.wake_floor

INTERVAL = 10.0
_namespaces = itertools.count()

Outcome = tuple[CycleReport, float | None] | Exception


class Clock:
    """The worker's monotonic clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEnforcer:
    """One target's engine: answers with whatever the test scripted for its host."""

    def __init__(self, engine: FakeEngine, endpoint: Endpoint) -> None:
        self.engine = engine
        self.endpoint = endpoint
        self.closed = False

    async def evaluate(
        self,
        spec: PolicySpec,
        *,
        policy: str,
        target: str,
        before_write: WriteAhead | None = None,
        check: ServerCheck | None = None,
    ) -> tuple[CycleReport, float | None]:
        if check is not None:
            await check()  # raises to refuse: then nothing is evaluated, as the engine does
        self.engine.evaluated.append(self.endpoint.host)
        outcome = self.engine.outcomes.get(self.endpoint.host, (cycle_report(), None))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def release_autovacuum(self, written: int, check: ServerCheck | None = None) -> ReleaseReport:
        if check is not None:
            await check()
        self.engine.releases.append((self.endpoint.host, written))
        return ReleaseReport(written=written, outcome=self.engine.release_outcome)

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        yield  # the fake needs no connection

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeEngine:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    evaluated: list[str] = field(default_factory=list)
    made: list[FakeEnforcer] = field(default_factory=list)
    releases: list[tuple[str, int]] = field(default_factory=list)
    release_outcome: str = "reset"

    def make(self, endpoint: Endpoint) -> TargetEnforcer:
        enforcer = FakeEnforcer(self, endpoint)
        self.made.append(enforcer)
        return enforcer

    def closed(self) -> list[str]:
        return [e.endpoint.host for e in self.made if e.closed]


@dataclass
class StatusCall:
    updates: list[TargetUpdate]
    owned: list[str]
    condition: PolicyCondition | None
    force: bool


class FakeSecrets:
    def __init__(self, error: CredentialsError | None = None) -> None:
        self.error = error
        self.reads = 0
        self.invalidated: list[tuple[str, str]] = []

    async def credentials(self, namespace: str, ref: CredentialsSecret) -> Credentials:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return Credentials("warden", "not-a-real-password")

    def invalidate(self, namespace: str, name: str) -> None:
        self.invalidated.append((namespace, name))


@dataclass
class Harness:
    worker: PolicyWorker
    engine: FakeEngine
    clock: Clock
    secrets: FakeSecrets
    statuses: list[StatusCall]
    events: list[PolicyEvent]

    async def step(self, pods: list[PodInfo], *, generation: int = 1, **spec: Any) -> float:
        return await self.worker.step(body(generation, **spec), pods)

    async def settle(self) -> None:
        """Let every evaluation in flight land (the fake engine answers at once)."""
        await asyncio.gather(*self.worker.inflight())

    async def starts(self, pods: list[PodInfo], **spec: Any) -> int:
        """One step; how many evaluations it started, once they landed and a step at the same instant
        harvested them (as wait_for_work wakes the loop when a pass lands)."""
        await self.step(pods, **spec)
        started = len(self.worker.inflight())
        await self.settle()
        await self.step(pods, **spec)
        assert not self.worker.inflight(), "a target evaluated again at once"
        return started


def body(generation: int = 1, **spec: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "pg"}},
        "connection": {"port": 5432, "credentialsSecret": {"name": "pg-credentials"}},
        "interval": f"{INTERVAL:g}s",
    }
    fields.update(spec)
    return {"metadata": {"name": "p", "generation": generation}, "spec": fields}


def pod(name: str, ip: str, *, sidecar: bool = False) -> PodInfo:
    annotations = {ENFORCER_ANNOTATION: EnforcerKind.SIDECAR.value} if sidecar else {}
    return PodInfo(name, "ns", "Running", ip, {"app": "pg"}, annotations)


DB0 = pod("db-0", "127.0.0.2")
DB1 = pod("db-1", "127.0.0.3")


@pytest.fixture
def make_harness() -> Callable[..., Harness]:
    def make(kind: EnforcerKind = EnforcerKind.CONTROLLER, secrets: FakeSecrets | None = None) -> Harness:
        engine, clock = FakeEngine(), Clock()
        statuses: list[StatusCall] = []
        events: list[PolicyEvent] = []
        secrets = secrets or FakeSecrets()

        async def write_status(
            updates: list[TargetUpdate], owned: list[str], condition: PolicyCondition | None, force: bool
        ) -> None:
            statuses.append(StatusCall(list(updates), list(owned), condition, force))

        worker = PolicyWorker(
            namespace=f"worker-test-{next(_namespaces)}",
            name="p",
            secrets=secrets,
            make_enforcer=engine.make,
            write_status=write_status,
            post_event=events.append,
            concurrency=asyncio.Semaphore(4),
            enforcer_kind=kind,
            clock=clock,
        )
        return Harness(worker, engine, clock, secrets, statuses, events)

    return make


async def test_a_pass_evaluates_every_target_and_reports_when_it_lands(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    terminated = cycle_report(action(41), action(42))
    h.engine.outcomes["127.0.0.2"] = (terminated, None)
    await h.step([DB0, DB1])
    assert len(h.worker.inflight()) == 2
    await h.settle()
    assert sorted(h.engine.evaluated) == ["127.0.0.2", "127.0.0.3"]
    # The new target set is reported at once; the outcomes with the step after the pass lands.
    assert [(c.updates, c.owned) for c in h.statuses] == [([], ["db-0", "db-1"])]
    await h.step([DB0, DB1])
    last = h.statuses[-1]
    assert {u.pod: u.report for u in last.updates} == {"db-0": terminated, "db-1": cycle_report()}
    assert [(e.reason, e.message) for e in h.events] == [
        (EventReason.SESSIONS_TERMINATED, "pod db-0: rule idle terminated 2 sessions (pids 41, 42)")
    ]
    assert h.secrets.reads == 2


async def test_next_evaluation_follows_the_engines_deadline_within_the_wake_floor_and_interval(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    h.engine.outcomes["127.0.0.2"] = (cycle_report(), 3.0)
    assert await h.starts([DB0]) == 1
    h.clock.advance(2.9)
    assert await h.starts([DB0]) == 0
    h.clock.advance(0.1)
    assert await h.starts([DB0]) == 1  # the engine's deadline: 3 s after the evaluation started
    h.engine.outcomes["127.0.0.2"] = (cycle_report(), 0.01)
    h.clock.advance(3.0)
    assert await h.starts([DB0]) == 1
    h.clock.advance(WAKE_FLOOR - 0.01)
    assert await h.starts([DB0]) == 0  # never more often than the wake floor
    h.clock.advance(0.01)
    assert await h.starts([DB0]) == 1
    h.engine.outcomes["127.0.0.2"] = (cycle_report(), None)
    h.clock.advance(WAKE_FLOOR)
    assert await h.starts([DB0]) == 1
    h.clock.advance(INTERVAL - 0.01)
    assert await h.starts([DB0]) == 0  # nothing pending: the interval
    h.clock.advance(0.01)
    assert await h.starts([DB0]) == 1
    h.engine.outcomes["127.0.0.2"] = (cycle_report(), 1000.0)
    h.clock.advance(INTERVAL)
    assert await h.starts([DB0]) == 1
    h.clock.advance(INTERVAL)
    assert await h.starts([DB0]) == 1  # never later than the interval


async def test_a_refused_login_drops_the_cached_secret_and_other_failures_do_not(
    make_harness: Callable[..., Harness],
) -> None:
    """A password rotated in PostgreSQL before the Secret: the next attempt must read the Secret again, not
    wait out the cache (the controller's SecretReader keeps it secret_cache_ttl seconds)."""
    h = make_harness()
    h.engine.outcomes["127.0.0.2"] = TargetUnreachable("connection to 127.0.0.2:5432 refused")
    await h.starts([DB0])
    assert h.secrets.invalidated == []
    h.clock.advance(INTERVAL)
    h.engine.outcomes["127.0.0.2"] = AuthenticationFailed("authentication failed for the user in Secret pg-credentials")
    await h.starts([DB0])
    assert h.secrets.invalidated == [(h.worker.namespace, "pg-credentials")]


async def test_a_failing_target_backs_off_doubling_up_to_the_interval_and_recovers(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    h.engine.outcomes["127.0.0.2"] = TargetUnreachable("connection to 127.0.0.2:5432 refused")
    assert await h.starts([DB0]) == 1
    delays = []
    for _ in range(5):
        waited = 0.0
        while not await h.starts([DB0]):
            h.clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    # The one retry rule (Settings.retry_delay): min_delay doubling, capped by the interval (and max_backoff).
    assert delays == [1.0, 2.0, 4.0, 8.0, INTERVAL]
    assert DEFAULTS.max_backoff > INTERVAL
    errors = [u for c in h.statuses for u in c.updates if u.error]
    assert len(errors) == 6
    assert all(u.error == "connection to 127.0.0.2:5432 refused" for u in errors)
    assert h.engine.closed() == ["127.0.0.2"] * 6  # every failure drops the connection
    h.engine.outcomes["127.0.0.2"] = (cycle_report(), None)
    h.clock.advance(INTERVAL)
    assert await h.starts([DB0]) == 1
    await h.step([DB0])
    assert h.worker.states["db-0"].failures == 0
    assert h.statuses[-1].updates[0].error is None


async def test_a_changed_generation_makes_every_target_due_at_once(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    assert await h.starts([DB0, DB1]) == 2
    h.clock.advance(1.0)
    assert await h.starts([DB0, DB1]) == 0
    assert await h.starts([DB0, DB1], generation=2) == 2


async def test_credentials_error_is_a_condition_backs_off_and_connects_nowhere(
    make_harness: Callable[..., Harness],
) -> None:
    missing = CredentialsError(ConditionReason.CREDENTIALS_SECRET_NOT_FOUND, "Secret ns/pg-credentials not found")
    h = make_harness(secrets=FakeSecrets(missing))
    await h.step([DB0])
    assert h.engine.made == []
    (call,) = h.statuses
    assert call.condition == PolicyCondition(
        ConditionType.READY, "False", ConditionReason.CREDENTIALS_SECRET_NOT_FOUND, "Secret ns/pg-credentials not found"
    )
    h.clock.advance(MIN_DELAY - 0.1)
    await h.step([DB0])
    assert h.secrets.reads == 1  # backing off: the first retry comes min_delay after the failure
    h.secrets.error = None
    h.clock.advance(0.1)
    assert await h.starts([DB0]) == 1
    assert h.engine.evaluated == ["127.0.0.2"]


async def test_central_controller_refuses_a_policy_without_credentials(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    await h.step([DB0], connection={"port": 5432})
    assert h.engine.made == []
    condition = h.statuses[-1].condition
    assert condition is not None
    assert condition.reason == ConditionReason.CREDENTIALS_NOT_CONFIGURED


async def test_a_departed_pod_is_closed_forgotten_and_its_series_dropped(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    await h.starts([DB0, DB1])
    namespace = h.worker.namespace
    assert _series(namespace, "db-1")
    await h.step([DB0])
    assert h.engine.closed() == ["127.0.0.3"]
    assert sorted(h.worker.states) == ["db-0"]
    assert h.statuses[-1].owned == ["db-0"]
    assert _series(namespace, "db-1") == set()
    assert _series(namespace, "db-0")


def _series(namespace: str, pod: str) -> set[tuple[str, ...]]:
    return {
        tuple(sample.labels.values())
        for family in metrics.REGISTRY.collect()
        if family.name == "pgwarden_backends"
        for sample in family.samples
        if (sample.labels["namespace"], sample.labels["policy"], sample.labels["pod"]) == (namespace, "p", pod)
    }


async def test_the_controller_leaves_sidecar_pods_alone_with_a_notice(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    own = pod("db-2", "127.0.0.4", sidecar=True)
    await h.starts([DB0, own])
    assert h.engine.evaluated == ["127.0.0.2"]
    (notice,) = [u for u in h.statuses[-1].updates if u.skipped_reason]
    assert notice.pod == "db-2"
    assert notice.skipped_reason is not None
    assert "sidecar" in notice.skipped_reason
    assert h.statuses[-1].owned == ["db-0"]


async def test_a_sidecar_leaves_unannotated_pods_to_the_controller(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(kind=EnforcerKind.SIDECAR)
    h.worker.fixed_endpoint = Endpoint(host="local", port=0, dbname="", sslmode="", user=None)
    own = pod("db-2", "127.0.0.4", sidecar=True)
    await h.starts([DB0, own], connection={"port": 5432})  # no Secret: the sidecar uses its own endpoint
    assert h.engine.evaluated == ["local"]
    assert h.secrets.reads == 0
    (notice,) = [u for u in h.statuses[-1].updates if u.skipped_reason]
    assert (notice.pod, notice.enforcer) == ("db-0", EnforcerKind.SIDECAR)


async def test_a_step_with_nothing_new_writes_no_status(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    await h.starts([DB0])
    writes = len(h.statuses)
    h.clock.advance(1.0)
    delay = await h.step([DB0])
    assert len(h.statuses) == writes
    assert delay == IDLE_POLL  # due at +10 s, but a sleeping worker still looks for new pods every IDLE_POLL
    h.clock.advance(INTERVAL - 1.0 - 0.5)
    assert await h.step([DB0]) == pytest.approx(0.5)
    assert len(h.statuses) == writes


async def test_an_invalid_spec_is_reported_and_lets_go_of_every_target(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    await h.starts([DB0])
    delay = await h.step([DB0], generation=2, interval="soon")
    assert delay == DEFAULTS.invalid_spec_poll
    assert h.worker.states == {}
    assert h.engine.closed() == ["127.0.0.2"]
    call = h.statuses[-1]
    assert (call.updates, call.owned, call.force) == ([], [], False)  # written in the background, as any step
    assert call.condition is not None
    assert (call.condition.type, call.condition.reason) == (ConditionType.READY, ConditionReason.INVALID_SPEC)
    assert "spec.interval" in call.condition.message


async def test_an_interrupted_cycle_still_reports_what_postgresql_accepted(
    make_harness: Callable[..., Harness],
) -> None:
    """The connection broke part way through acting: the target is failing, and the signals sent before the
    break still reach status (entry and totals) and Events."""
    h = make_harness()
    partial = cycle_report(action(41), action(42))
    h.engine.outcomes["127.0.0.2"] = CycleInterrupted("connection lost while signalling", partial)
    await h.step([DB0])
    await h.settle()
    await h.step([DB0])
    (update,) = h.statuses[-1].updates
    assert update.report is partial
    assert update.error == "connection lost while signalling"
    assert update.totals()["terminated"] == 2
    assert [(e.reason, e.message) for e in h.events] == [
        (EventReason.SESSIONS_TERMINATED, "pod db-0: rule idle terminated 2 sessions (pids 41, 42)")
    ]
    assert h.worker.states["db-0"].failures == 1


async def test_the_target_is_up_after_a_completed_cycle_and_down_after_an_interrupted_one(
    make_harness: Callable[..., Harness],
) -> None:
    """pgwarden_target_up and the last success time (alerts PgwardenTargetFailing, PgwardenEnforcementStalled)
    move with completed cycles only; the policy's interval is exported for the stall alert's threshold."""
    h = make_harness()
    labels = {"namespace": h.worker.namespace, "policy": "p", "pod": "db-0"}
    await h.step([DB0])
    await h.settle()
    assert metrics.REGISTRY.get_sample_value("pgwarden_target_up", labels) == 1
    success = metrics.REGISTRY.get_sample_value("pgwarden_last_success_timestamp_seconds", labels)
    assert success is not None
    interval = {"namespace": h.worker.namespace, "policy": "p"}
    assert metrics.REGISTRY.get_sample_value("pgwarden_policy_interval_seconds", interval) == INTERVAL
    h.engine.outcomes["127.0.0.2"] = CycleInterrupted("connection lost while signalling", cycle_report(action(41)))
    await h.step([DB0])  # harvests the pass
    h.clock.now += 2 * INTERVAL
    await h.step([DB0])  # due again: the interrupted cycle
    await h.settle()
    assert h.engine.evaluated == ["127.0.0.2", "127.0.0.2"]
    assert metrics.REGISTRY.get_sample_value("pgwarden_target_up", labels) == 0
    assert metrics.REGISTRY.get_sample_value("pgwarden_last_success_timestamp_seconds", labels) == success


async def test_the_endpoint_carries_the_policys_require_auth(make_harness: Callable[..., Harness]) -> None:
    """spec.connection.requireAuth reaches the engine (the weakest method the password is given to)."""
    h = make_harness()
    await h.step([DB0])
    await h.settle()
    h2 = make_harness()
    connection = {"port": 5432, "credentialsSecret": {"name": "pg-credentials"}, "requireAuth": "md5"}
    await h2.step([DB0], connection=connection)
    await h2.settle()
    assert [e.endpoint.require_auth for e in h.engine.made] == ["scram-sha-256"]
    assert [e.endpoint.require_auth for e in h2.engine.made] == ["md5"]


async def test_missing_grants_post_one_warning_per_change_never_per_cycle(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()

    async def cycle(*missing: str) -> None:
        h.engine.outcomes["127.0.0.2"] = (cycle_report(missing_privileges=missing), None)
        await h.starts([DB0])
        h.clock.advance(INTERVAL)

    def warnings() -> list[str]:
        return [e.message for e in h.events if e.reason == EventReason.INSUFFICIENT_PRIVILEGES]

    for _ in range(3):
        await cycle("pg_signal_backend")
    assert len(warnings()) == 1
    assert all(e.type == "Warning" for e in h.events)
    assert warnings()[0].startswith("pod db-0: missing pg_signal_backend: InsufficientPrivileges: role")
    (update,) = h.statuses[-1].updates
    assert update.entry(None)["error"].startswith("InsufficientPrivileges: ")
    for _ in range(2):
        await cycle("pg_read_all_stats", "pg_signal_backend")  # one more grant missing: a change
    assert len(warnings()) == 2
    assert "pg_read_all_stats, pg_signal_backend" in warnings()[1]
    await cycle()  # granted: no Warning
    await cycle()
    assert len(warnings()) == 2
    await cycle("pg_signal_backend")  # revoked again: a change
    assert len(warnings()) == 3


async def test_a_closed_worker_forgets_its_policys_series(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.engine.outcomes["127.0.0.2"] = TargetUnreachable("refused")
    await h.starts([DB0, DB1])
    namespace = h.worker.namespace
    assert _policy_series(namespace)
    await h.worker.close()
    assert _policy_series(namespace) == []
    assert sorted(h.engine.closed()) == ["127.0.0.2", "127.0.0.3"]


def _policy_series(namespace: str) -> list[tuple[str, ...]]:
    return [tuple(labels) for m in metrics._PER_POLICY for labels in list(m._metrics) if labels[0] == namespace]


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_five_thousand_pods_and_fifty_policies_come_and_go_without_growing_rss(
    make_harness: Callable[..., Harness],
) -> None:
    """Workers (with their engines, status sink and metric series) for 50 policies x 100 pods each, every pod
    created, evaluated (actions, skips, errors, backend gauges) and deleted, every policy closed."""

    namespaces: set[str] = set()

    async def round_of_policies(first_pod: int) -> None:
        h = make_harness()
        namespaces.add(h.worker.namespace)
        pods = [pod(f"db-{first_pod + i}", f"127.1.{i // 200}.{i % 200 + 1}") for i in range(100)]
        for p in pods[::7]:
            h.engine.outcomes[p.pod_ip or ""] = TargetUnreachable("refused")
        report = cycle_report(action(7), skipped=(SkipRecord("idle", 8, SkipReason.MAX_ACTIONS),))
        for p in pods[1::7]:
            h.engine.outcomes[p.pod_ip or ""] = (report, None)
        await h.starts(pods)
        await h.step([])  # every pod deleted
        await h.worker.close()  # the policy deleted

    for i in range(5):  # warm up: allocator arenas, prometheus_client, structlog
        await round_of_policies(100 * i)
    gc.collect()
    before = _rss_kib()
    for i in range(50):
        await round_of_policies(100_000 + 100 * i)
    gc.collect()
    after = _rss_kib()
    print(
        f"RSS before {before} KiB, after 5,000 pods and 50 policies created and deleted {after} KiB: "
        f"{after - before:+d} KiB"
    )
    assert after - before < 10 * 1024
    assert not [labels for m in metrics._PER_POLICY for labels in list(m._metrics) if labels[0] in namespaces]


def with_records(spec_body: dict[str, Any], *records: tuple[str, int]) -> dict[str, Any]:
    """A policy body whose status says the controller wrote autovacuum_max_workers on these pods."""
    targets = [
        {"pod": pod, "enforcer": "controller", "autovacuum": {"written": {"value": v, "time": "2026-01-01T00:00:00Z"}}}
        for pod, v in records
    ]
    return {**spec_body, "status": {"targets": targets}}


async def test_what_status_says_was_written_is_remembered_by_the_engine(make_harness: Callable[..., Harness]) -> None:
    """After a restart the engine's memory is empty: the worker seeds it from status, so a value a DBA wrote
    since is reported (foreign_value) instead of taken for a leftover and overwritten."""
    h = make_harness()
    policy = with_records(body(sessions=[], autovacuum={"maxWorkers": 2}), ("db-0", 4))
    await h.worker.step(policy, [DB0, DB1])
    assert CLAIMS.last_written("127.0.0.2:5432", h.worker.policy_key) == 4
    assert CLAIMS.last_written("127.0.0.3:5432", h.worker.policy_key) is None  # nothing recorded there
    CLAIMS.record_write("127.0.0.2:5432", h.worker.policy_key, 2)
    await h.worker.step(policy, [DB0, DB1])  # status lags what this process wrote since: the engine knows better
    assert CLAIMS.last_written("127.0.0.2:5432", h.worker.policy_key) == 2
    CLAIMS.drop("127.0.0.2:5432", h.worker.policy_key)


async def test_removing_the_cap_releases_each_record_once_and_drops_it(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    policy = with_records(body(sessions=[]), ("db-0", 2), ("db-1", 3))
    await h.worker.step(policy, [DB0, DB1])
    assert sorted(h.engine.releases) == [("127.0.0.2", 2), ("127.0.0.3", 3)]
    released = [u for call in h.statuses for u in call.updates if u.released]
    assert sorted(u.pod for u in released) == ["db-0", "db-1"]
    await h.settle()
    await h.worker.step(policy, [DB0, DB1])  # the status the worker sees may lag its own write
    assert len(h.engine.releases) == 2
    assert h.events == []


async def test_a_deselected_pod_is_released_and_a_gone_one_named(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    policy = with_records(body(sessions=[], autovacuum={"maxWorkers": 2}), ("db-0", 2), ("db-1", 2), ("db-9", 2))
    elsewhere = PodInfo("db-1", "ns", "Running", "127.0.0.3", {"app": "other"}, {})
    await h.worker.step(policy, [DB0, elsewhere])
    assert h.engine.releases == [("127.0.0.3", 2)]  # db-0 still wants its cap; db-9 is gone
    left = [e for e in h.events if e.reason == EventReason.AUTOVACUUM_LEFT_BEHIND]
    assert len(left) == 1
    assert left[0].type == "Warning"
    assert "db-9" in left[0].message
    assert "autovacuum_max_workers = 2" in left[0].message


async def test_a_value_someone_changed_is_named_not_reset(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.engine.release_outcome = "changed"
    await h.worker.release(parse_spec(body(sessions=[])["spec"]), [DB0], 5.0, with_records({}, ("db-0", 2))["status"])
    assert h.engine.releases == [("127.0.0.2", 2)]
    assert [e.reason for e in h.events] == [EventReason.AUTOVACUUM_LEFT_BEHIND]


async def test_a_dry_run_policy_never_writes_at_deletion_and_names_what_it_left(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    dry = parse_spec(body(sessions=[], enforcementAction="dryRun", autovacuum={"maxWorkers": 2})["spec"])
    await h.worker.release(dry, [DB0], 5.0, with_records({}, ("db-0", 2))["status"])
    assert h.engine.releases == []
    assert [e.reason for e in h.events] == [EventReason.AUTOVACUUM_LEFT_BEHIND]
    assert "dryRun" in h.events[0].message
    await h.worker.release(dry, [DB0], 5.0, {})  # nothing recorded: nothing to do, nothing to say
    assert len(h.events) == 1


async def test_a_pod_whose_address_cannot_be_confirmed_is_not_acted_on(make_harness: Callable[..., Harness]) -> None:
    """A stale pods index plus a reused IP: the check refuses, nothing is evaluated, the target says why."""
    h = make_harness()
    refused = ["db-0"]

    async def check(pod: PodInfo) -> None:
        if pod.name in refused:
            raise PodMoved(f"pod {pod.name} now has address 10.0.0.9, not {pod.pod_ip}")

    h.worker.check_pod = check
    h.engine.outcomes["127.0.0.2"] = (cycle_report(action(41)), None)
    await h.step([DB0, DB1])
    await h.settle()
    await h.step([DB0, DB1])
    assert h.engine.evaluated == ["127.0.0.3"]  # db-1 only
    errors = {u.pod: u.error for u in h.statuses[-1].updates}
    assert "now has address 10.0.0.9" in (errors["db-0"] or "")
    assert errors["db-1"] is None
    assert not h.events  # nothing was done, so nothing is evented
    refused.clear()
    h.clock.advance(INTERVAL)
    await h.step([DB0, DB1])
    await h.settle()
    assert "127.0.0.2" in h.engine.evaluated


async def test_the_sidecar_checks_no_address_its_server_is_its_own(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()

    async def check(pod: PodInfo) -> None:
        raise AssertionError("the controller's address check ran for a fixed endpoint")

    h.worker.check_pod = check
    h.worker.fixed_endpoint = Endpoint("local", 0, "", "", None)
    await h.step([DB0])
    await h.settle()
    assert h.engine.evaluated == ["local"]


async def test_a_target_is_observed_once_per_shortest_threshold_even_with_nothing_due(
    make_harness: Callable[..., Harness],
) -> None:
    """Look-ahead: a session that goes idle just after an observation is seen before it can cross."""
    h = make_harness()
    rules = [{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": "3s"}]
    assert await h.starts([DB0], interval="30s", sessions=rules) == 1
    h.clock.advance(2.9)
    assert await h.starts([DB0], interval="30s", sessions=rules) == 0
    h.clock.advance(0.2)
    assert await h.starts([DB0], interval="30s", sessions=rules) == 1  # at 3 s, not at 30 s


async def test_a_pass_that_split_merges_again_at_the_next_regular_pass(make_harness: Callable[..., Harness]) -> None:
    """db-1 fails once and its retry puts it a second behind db-0: at db-0's next pass it joins early,
    and from then on both are one pass (one step, one status write), not two for good."""
    h = make_harness()
    h.engine.outcomes["127.0.0.3"] = TargetUnreachable("connection refused")
    assert await h.starts([DB0, DB1]) == 2
    del h.engine.outcomes["127.0.0.3"]
    h.clock.advance(MIN_DELAY)
    assert await h.starts([DB0, DB1]) == 1  # db-1's retry, alone
    h.clock.advance(INTERVAL - MIN_DELAY)
    assert await h.starts([DB0, DB1]) == 2  # db-0 is due; db-1, due a second later, joins it
    h.clock.advance(INTERVAL - 0.01)
    assert await h.starts([DB0, DB1]) == 0
    h.clock.advance(0.01)
    assert await h.starts([DB0, DB1]) == 2  # together
    assert h.engine.evaluated.count("127.0.0.3") == 4


async def test_a_target_waiting_for_a_crossing_neither_joins_early_nor_pulls_others_forward(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    h.engine.outcomes["127.0.0.3"] = (cycle_report(), 6.0)  # db-1: a session crosses in 6 s
    assert await h.starts([DB0, DB1]) == 2
    h.engine.outcomes["127.0.0.3"] = (cycle_report(), 5.0)  # and then another 5 s later
    h.clock.advance(6.0)
    assert await h.starts([DB0, DB1]) == 1  # db-1 at its crossing; db-0 (due in 4 s) is not pulled forward
    h.clock.advance(4.0)
    assert await h.starts([DB0, DB1]) == 1  # db-0 at its interval; db-1 waits for its crossing, a second on
    h.clock.advance(1.0)
    assert await h.starts([DB0, DB1]) == 1
    assert h.engine.evaluated == ["127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.2", "127.0.0.3"]


async def test_a_pod_taken_from_the_sidecar_is_held_for_the_handover_grace(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    grace = h.worker.settings.sidecar_release_grace  # back from a sidecar: its own, longer grace
    sidecars = pod("db-0", "127.0.0.2", sidecar=True)
    assert await h.starts([sidecars]) == 0  # the sidecar's
    # The annotation goes: the controller takes the pod, but starts nothing until the grace has passed.
    assert await h.starts([DB0]) == 0
    h.clock.advance(grace - 0.1)
    assert await h.starts([DB0]) == 0
    assert h.engine.evaluated == []
    h.clock.advance(0.1)
    assert await h.starts([DB0]) == 1


async def test_a_pod_whose_status_the_sidecar_wrote_is_held_and_a_fresh_one_is_not(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    written = body()
    written["status"] = {"targets": [{"pod": "db-0", "enforcer": "sidecar"}, {"pod": "db-1", "enforcer": "controller"}]}
    await h.worker.step(written, [DB0, DB1])
    await h.settle()
    assert h.engine.evaluated == ["127.0.0.3"]  # db-1 at once; db-0 after the grace (a restart mid-handover)
    assert h.worker.states["db-0"].held_until == h.clock.now + h.worker.settings.sidecar_release_grace


async def test_a_sidecar_starts_nothing_before_its_own_grace(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(kind=EnforcerKind.SIDECAR)
    h.worker.fixed_endpoint = Endpoint(host="local", port=0, dbname="", sslmode="", user=None)
    first_seen = h.clock.now
    h.worker.not_before = lambda: first_seen + 5.0
    own = pod("db-2", "127.0.0.4", sidecar=True)
    assert await h.starts([own], connection={"port": 5432}) == 0
    assert h.worker.due() is False
    h.clock.advance(5.0)
    assert h.worker.due() is True
    assert await h.starts([own], connection={"port": 5432}) == 1
