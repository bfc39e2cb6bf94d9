"""One policy's enforcement loop: pick targets, evaluate the due ones concurrently, report.

Each target keeps its own schedule: the engine says when the next session will cross a threshold,
and the target is evaluated again then (never later than `interval`, never more often than once a
second). Each evaluation runs as its own task, so a slow or failing target (a connect or statement
timeout) never delays the others: it backs off on its own schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from pgwarden.enforcement import metrics
from pgwarden.enforcement.events import PolicyEvent, events_for_cycle
from pgwarden.enforcement.kube import Credentials, CredentialsError
from pgwarden.enforcement.status import PolicyCondition, TargetUpdate, WrittenRecord, privilege_error, written_records
from pgwarden.enforcement.targets import PodInfo, select_targets
from pgwarden.engine.autovacuum_claims import CLAIMS
from pgwarden.engine.autovacuum_plan import ReleaseReport, WriteAhead
from pgwarden.engine.errors import AuthenticationFailed, CycleInterrupted
from pgwarden.engine.report import CycleReport
from pgwarden.engine.types import ServerCheck
from pgwarden.policy import CredentialsSecret, EnforcementAction, PolicyError, PolicySpec, parse_spec
from pgwarden.policy.api import ConditionReason, ConditionType, EnforcerKind, EventReason
from pgwarden.settings import DEFAULTS, Settings

log = structlog.get_logger("pgwarden.controller")


class TargetEnforcer(Protocol):
    """What the worker needs from the engine for one PostgreSQL server (see pgwarden.engine.session)."""

    async def evaluate(
        self,
        spec: PolicySpec,
        *,
        policy: str,
        target: str,
        before_write: WriteAhead | None = None,
        check: ServerCheck | None = None,
    ) -> tuple[CycleReport, float | None]:
        """Run one cycle; return its report and seconds until the next threshold (None: none seen).
        `before_write` records an autovacuum value in status before the engine writes it; `check` confirms a
        new connection's server before anything is done there."""

    async def release_autovacuum(self, written: int, check: ServerCheck | None = None) -> ReleaseReport: ...

    async def close(self) -> None: ...

    def connected(self) -> AbstractAsyncContextManager[None]:
        """Wait for this target's own connection (bounded), before the caller takes a shared slot."""


class CredentialSource(Protocol):
    """Where the controller's credentials come from (`pgwarden.enforcement.kube.SecretReader`)."""

    async def credentials(self, namespace: str, ref: CredentialsSecret) -> Credentials:
        """The username and password the Secret holds; raises CredentialsError saying why not."""

    def invalidate(self, namespace: str, name: str) -> None:
        """Forget the Secret: the server refused what it held, so the next attempt reads it again."""


def needs_release(status: Mapping[str, Any] | None) -> bool:
    """Whether deleting the policy has something to undo on its targets: what status records pgwarden wrote
    (`autovacuum.written`), and nothing else (the value in postgresql.auto.conf may be a DBA's own, equal to
    the one the policy names). A dry-run policy never writes, at deletion included: it only names the records
    an earlier enforcing spec left (see PolicyWorker.release)."""
    return any(written_records(status, kind) for kind in EnforcerKind)


RELEASED_OUTCOMES = frozenset({"reset", "absent"})
"""Release outcomes after which nothing pgwarden wrote is left in postgresql.auto.conf."""


@dataclass(frozen=True)
class Endpoint:
    """Everything that, when it changes, needs a new connection."""

    host: str
    port: int
    dbname: str
    sslmode: str
    user: str | None
    password: str | None = field(repr=False, default=None)
    credentials_source: str | None = None  # "Secret NAME": how engine messages name the credentials
    require_auth: str = "scram-sha-256"  # spec.connection.requireAuth: the weakest method given the password


EnforcerFactory = Callable[[Endpoint], TargetEnforcer]
PodCheck = Callable[[PodInfo], Awaitable[None]]
"""Confirms, before the first action on a new connection, that the pod still exists with the address the
(possibly stale) pods index gave; raises to refuse. A stale index plus a reused IP would otherwise point
pgwarden at another team's server."""
StatusSink = Callable[[list[TargetUpdate], list[str], PolicyCondition | None, bool], Awaitable[None]]
EventSink = Callable[[PolicyEvent], None]


@dataclass(eq=False)
class Pass:
    """Targets that fell due in the same step. From then until the last of them is reported is one cycle
    over them; on a quiet cluster that is every target (the pgwarden_policy_pass_duration_seconds metric)."""

    started: float
    targets: int
    pending: int


@dataclass(slots=True)
class TargetState:
    """One target of one policy (20 policies x 200 pods: 4,000 of them, so slots, not a dict each)."""

    pod: PodInfo
    endpoint: Endpoint | None = None
    enforcer: TargetEnforcer | None = None
    next_due: float = 0.0
    failures: int = 0
    task: asyncio.Task[TargetUpdate] | None = None  # the evaluation in flight, if any
    batch: Pass | None = None  # the pass that evaluation belongs to
    missing_privileges: tuple[str, ...] = ()  # the grants the last report said were missing (Event per change)
    held_until: float = 0.0  # handover: nothing starts on this target before then (see PolicyWorker._handover_hold)
    regular: bool = False  # next_due is its pass's start plus the observation gap: no crossing is waited for

    async def drop_connection(self) -> None:
        if self.enforcer is not None:
            enforcer, self.enforcer = self.enforcer, None
            await enforcer.close()

    async def close(self) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.drop_connection()


@dataclass
class PolicyWorker:
    """Enforces one PostgresPolicy on its targets until stopped."""

    namespace: str
    name: str
    secrets: CredentialSource | None
    make_enforcer: EnforcerFactory
    write_status: StatusSink
    post_event: EventSink
    concurrency: asyncio.Semaphore
    enforcer_kind: str = EnforcerKind.CONTROLLER
    fixed_endpoint: Endpoint | None = None  # the sidecar's own server: no pod IPs, no Secrets
    check_pod: PodCheck | None = None  # the controller's address check (the sidecar's server is its own)
    states: dict[str, TargetState] = field(default_factory=dict)
    _generation: int | None = None
    _parsed: tuple[int | None, PolicySpec] | None = None
    _reported: tuple[list[str], int | None] | None = None  # (owned pods, generation) last given to write_status
    _released: set[WrittenRecord] = field(default_factory=set)  # records already released (the body may lag)
    settings: Settings = DEFAULTS
    clock: Callable[[], float] = time.monotonic  # tests step time by hand
    not_before: Callable[[], float] | None = None
    """The sidecar's hold: no target starts before this clock reading (its handover grace after it first saw
    its pod annotated); the controller has none (its holds come from seeing the sidecar own a pod)."""
    _counterpart_seen: set[str] = field(default_factory=set)  # pods seen enforced by the sidecar/controller

    @property
    def policy_key(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def step(self, body: Mapping[str, Any], pods: Iterable[PodInfo]) -> float:
        """Evaluate whatever is due now; return how long to sleep before the next step."""
        generation = (body.get("metadata") or {}).get("generation")
        spec = await self._spec_or_report_invalid(generation, body)
        if spec is None:
            return self.settings.invalid_spec_poll
        self._note_generation(generation)
        metrics.record_interval(self.namespace, self.name, spec.interval.total_seconds())
        pods = list(pods)
        ours, skipped = self._choose_targets(spec, pods)
        self._counterpart_seen.update(p.name for p in skipped)
        released = await self._release_lapsed(spec, body.get("status"), pods, ours)
        await self._track(ours, body.get("status"))
        self._remember_written(spec, body.get("status"), ours)
        credentials_condition = await self._start_due(spec, self.clock())
        updates, finished = self._harvest()
        updates.extend(released)
        updates.extend(self._skip_notices(skipped))
        await self._report(updates, generation, credentials_condition)
        for done in finished:
            metrics.record_pass(self.namespace, self.name, done.targets, self.clock() - done.started)
        return self._next_wake(self.clock())

    def inflight(self) -> list[asyncio.Task[TargetUpdate]]:
        return [s.task for s in self.states.values() if s.task is not None]

    def _harvest(self) -> tuple[list[TargetUpdate], list[Pass]]:
        """Outcomes of the evaluations that finished since the last step, and the passes they completed."""
        updates = []
        finished = []
        for state in self.states.values():
            if state.task is not None and state.task.done():
                task, state.task = state.task, None
                updates.append(task.result())  # _evaluate turns every failure into an update
                batch, state.batch = state.batch, None
                if batch is not None:
                    batch.pending -= 1
                    if batch.pending == 0:
                        finished.append(batch)
        return updates, finished

    async def release(
        self, spec: PolicySpec, pods: Iterable[PodInfo], per_target_seconds: float, status: Mapping[str, Any] | None
    ) -> None:
        """At deletion: reset what status records this enforcer wrote (autovacuum_max_workers) on every target,
        each within a bound; what cannot be reset is named in an AutovacuumLeftBehind Event."""
        if not needs_release(status):
            return
        records = list(written_records(status, self.enforcer_kind).values())
        if spec.enforcement_action is not EnforcementAction.ENFORCE:
            for record in records:  # written while the policy enforced; a dry run never writes, not even this
                self._left_behind(record, "the policy is in dryRun now, which never writes")
            return
        by_name = {p.name: p for p in pods}
        await asyncio.gather(*(self._release_one(spec, by_name.get(r.pod), r, per_target_seconds) for r in records))

    async def _release_lapsed(
        self, spec: PolicySpec, status: Mapping[str, Any] | None, pods: list[PodInfo], ours: list[PodInfo]
    ) -> list[TargetUpdate]:
        """Reset what this policy wrote where it no longer wants a cap: spec.autovacuum (or its maxWorkers)
        removed, or the pod deselected. Once per record; the updates drop the records of targets kept."""
        if spec.enforcement_action is not EnforcementAction.ENFORCE:
            return []  # a dry-run policy never writes; what an earlier enforcing spec wrote waits for it
        keep = {p.name: p for p in ours} if spec.autovacuum.max_workers is not None else {}
        records = written_records(status, self.enforcer_kind)
        lapsed = [r for pod, r in records.items() if pod not in keep and r not in self._released]
        if not lapsed:
            return []
        self._released.update(lapsed)
        by_name = {p.name: p for p in pods}
        timeout = self.settings.release_timeout
        await asyncio.gather(*(self._release_one(spec, by_name.get(r.pod), r, timeout) for r in lapsed))
        ours_by_name = {p.name: p for p in ours}
        return [
            TargetUpdate(r.pod, ours_by_name[r.pod].pod_ip, self.enforcer_kind, released=True)
            for r in lapsed
            if r.pod in ours_by_name  # a deselected pod's entry goes anyway
        ]

    def _remember_written(self, spec: PolicySpec, status: Mapping[str, Any] | None, ours: list[PodInfo]) -> None:
        """Tell the engine what status records this policy wrote on each target (`autovacuum.written`): after a
        restart of the process it would otherwise take a DBA's later value for a leftover and overwrite it."""
        cap = spec.autovacuum.max_workers
        records = written_records(status, self.enforcer_kind) if cap is not None else {}
        if cap is None or not records or spec.enforcement_action is not EnforcementAction.ENFORCE:
            return
        for pod in ours:
            record = records.get(pod.name)
            if record is not None and (self.fixed_endpoint is not None or pod.pod_ip):
                fixed = self.fixed_endpoint
                server = f"{fixed.host}:{fixed.port}" if fixed else f"{pod.pod_ip}:{spec.connection.port}"
                CLAIMS.remember(server, self.policy_key, cap, record.value, spec.interval.total_seconds())

    async def _release_one(self, spec: PolicySpec, pod: PodInfo | None, record: WrittenRecord, seconds: float) -> None:
        """Reset one record's value if postgresql.auto.conf still holds it; otherwise say what is left behind."""
        reason: str
        if pod is None or (self.fixed_endpoint is None and not pod.pod_ip):
            reason = "the pod is gone or has no address"
        else:
            try:
                result = await asyncio.wait_for(self._reset(spec, pod, record.value), seconds)
            except Exception as exc:  # unreachable, credentials gone, timeout: named in the Event, never raised
                reason = str(exc)[:500] or type(exc).__name__
            else:
                log.info("released autovacuum_max_workers", policy=self.name, pod=pod.name, result=result.to_json())
                if result.outcome in RELEASED_OUTCOMES:
                    return
                reason = "; ".join([result.message, *result.errors]).strip("; ")
        self._left_behind(record, reason)

    def _left_behind(self, record: WrittenRecord, reason: str) -> None:
        log.warning("autovacuum_max_workers left behind", policy=self.name, pod=record.pod, reason=reason)
        self.post_event(
            PolicyEvent(
                "Warning",
                EventReason.AUTOVACUUM_LEFT_BEHIND,
                f"{record.pod}: autovacuum_max_workers = {record.value} written by pgwarden at {record.time} "
                f"not reset: {reason}",
            )
        )

    async def _reset(self, spec: PolicySpec, pod: PodInfo, value: int) -> ReleaseReport:
        enforcer = self.make_enforcer(await self._endpoint(spec, pod))
        try:
            return await enforcer.release_autovacuum(value, self._server_check(pod))
        finally:
            await enforcer.close()

    async def close(self) -> None:
        """Let go of every target, and forget the policy's metric series: the loop ends when the policy is
        deleted (controller daemon exit, sidecar policy removal) or the process stops."""
        await self._close_all()
        metrics.forget_policy(self.namespace, self.name)

    # -- internals ------------------------------------------------------------------------------------
    async def _spec_or_report_invalid(self, generation: int | None, body: Mapping[str, Any]) -> PolicySpec | None:
        """The parsed spec; for an invalid one, every target let go and the reason written (then None)."""
        try:
            return self._spec(generation, body)
        except PolicyError as exc:
            await self._close_all()
            condition = PolicyCondition(ConditionType.READY, "False", ConditionReason.INVALID_SPEC, str(exc))
            await self.write_status([], [], condition, False)
            log.warning("policy invalid; nothing enforced", policy=self.name, namespace=self.namespace, error=str(exc))
            return None

    def _note_generation(self, generation: int | None) -> None:
        if generation != self._generation:
            self._generation = generation
            for state in self.states.values():
                state.next_due = 0.0  # a changed policy takes effect now, on every target

    def _choose_targets(self, spec: PolicySpec, pods: Iterable[PodInfo]) -> tuple[list[PodInfo], list[PodInfo]]:
        """The selected pods this enforcer handles, and those its counterpart (sidecar or controller) does."""
        chosen = select_targets(spec.selector, pods)
        sidecar = self.enforcer_kind == EnforcerKind.SIDECAR
        ours = [p for p in chosen if p.sidecar_enforced == sidecar]
        skipped = [p for p in chosen if p.sidecar_enforced != sidecar]  # not `p not in ours`: O(n^2) on 200 pods
        return ours, skipped

    async def _track(self, ours: list[PodInfo], status: Mapping[str, Any] | None = None) -> None:
        """Drop departed targets (connections, metric series), add new ones, refresh the pods' details."""
        await self._forget_departed({p.name for p in ours})
        for pod in ours:
            state = self.states.get(pod.name)
            if state is None:
                state = self.states[pod.name] = TargetState(pod, held_until=self._handover_hold(pod.name, status))
            state.pod = pod
        metrics.TARGETS.labels(self.namespace, self.name).set(len(ours))

    def _handover_hold(self, pod: str, status: Mapping[str, Any] | None) -> float:
        """Until when a pod this enforcer just took stays untouched, so its previous enforcer has stopped.

        Taken from the counterpart (this worker saw the pod annotated the other way, or the status entry
        for it was written by the other kind): `handover_grace` from now, longer than the sidecar needs to
        notice (`sidecar_poll`; it also re-reads its pod right before starting an evaluation) plus one
        evaluation in flight, and than the controller needs (`idle_poll`, the evaluation is cancelled).
        A sidecar also holds everything until `not_before` (its own grace after first seeing the annotation).
        """
        now = self.clock()
        held = self.not_before() if self.not_before is not None else 0.0
        if pod in self._counterpart_seen or _written_by_other(status, pod, self.enforcer_kind):
            # Back from a sidecar: it may go on with its last read of the pod while it cannot read it anew.
            grace = (
                self.settings.sidecar_release_grace
                if self.enforcer_kind == EnforcerKind.CONTROLLER
                else self.settings.handover_grace
            )
            held = max(held, now + grace)
        if held > now:
            log.info("target held for handover", policy=self.policy_key, pod=pod, seconds=round(held - now, 1))
        return held

    def due(self) -> bool:
        """Whether a step now could start an evaluation (the sidecar re-reads its pod first)."""
        now = self.clock()
        return not self.states or any(
            s.task is None and s.next_due <= now and s.held_until <= now for s in self.states.values()
        )

    async def _start_due(self, spec: PolicySpec, now: float) -> PolicyCondition | None:
        """Start an evaluation task on every idle target that is due; a credentials problem instead backs
        them all off and is returned as the condition to report."""
        ready = [s for s in self.states.values() if s.task is None and s.held_until <= now]
        due = [s for s in ready if s.next_due <= now]
        if not due:
            return None
        interval = spec.interval.total_seconds()
        if any(s.regular for s in due):
            # A pass that split (a target that landed late, a first pass that spent seconds connecting) would
            # stay split for good, each part its own step and its own pass. So targets due by the gap alone
            # within `_joining` join the pass that is due now: observed early once, together from then on.
            # Never one that waits for a crossing (it would be observed before it, for nothing), and only
            # when a regular target is due (crossings come often; they must not drag the others forward).
            horizon = now + self._joining(spec)
            due += [s for s in ready if s.regular and now < s.next_due <= horizon]
        try:
            endpoints = {s.pod.name: await self._endpoint(spec, s.pod) for s in due}
        except CredentialsError as exc:
            for state in due:
                state.failures += 1
                state.next_due = now + self._backoff(state, interval)
                state.regular = False
                await state.drop_connection()
            log.warning("credentials unavailable; nothing enforced", policy=self.name, reason=exc.reason)
            return PolicyCondition(ConditionType.READY, "False", exc.reason, str(exc))
        batch = Pass(now, len(due), len(due))
        for state in due:
            state.batch = batch
            state.task = asyncio.create_task(
                self._evaluate(state, spec, endpoints[state.pod.name], interval),
                name=f"pgwarden {self.policy_key} {state.pod.name}",
            )
        return None

    def _skip_notices(self, skipped: list[PodInfo]) -> list[TargetUpdate]:
        """One status entry per selected pod the other kind of enforcer handles, saying so."""
        reason = (
            "enforced by its pgwarden sidecar (annotation pgwarden.dev/enforcer=sidecar)"
            if self.enforcer_kind == EnforcerKind.CONTROLLER
            else "not annotated pgwarden.dev/enforcer=sidecar; the central controller enforces it"
        )
        return [TargetUpdate(pod.name, pod.pod_ip, self.enforcer_kind, skipped_reason=reason) for pod in skipped]

    async def _report(
        self, updates: list[TargetUpdate], generation: int | None, condition: PolicyCondition | None
    ) -> None:
        """Hand the step's outcome to the status sink, unless the step has nothing to say."""
        owned = sorted(self.states)
        # A step that evaluated nothing and changed neither the target set nor the generation has nothing to
        # say; the status writer would work out that nothing changed, at the cost of a diff of the whole status.
        if updates or condition is not None or self._reported != (owned, generation):
            await self.write_status(updates, owned, condition, False)
            self._reported = (owned, generation)

    def _next_wake(self, now: float) -> float:
        """Seconds until the next step is worthwhile.

        wait_for_work wakes when *every* evaluation in flight has landed, not at each one: one step then
        harvests a whole pass and writes the status once. An evaluation in flight cannot make its target due
        sooner than min_delay after its pass began, except for a crossing it saw: waking then (to harvest and
        schedule the others while a slow target still runs) keeps a pass whole, so it is one status write, at
        the cost of up to min_delay for a crossing seen by a target whose pass-mate is slow; after that, the
        slow one landing wakes the loop. Targets not in flight wake the loop at their own due time.
        """
        min_delay, idle_poll = self.settings.min_delay, self.settings.idle_poll
        wakes = [max(s.next_due, s.held_until) for s in self.states.values() if s.task is None]
        wakes += [b.started + min_delay for s in self.states.values() if (b := s.batch) and b.started + min_delay > now]
        if not wakes:
            return idle_poll
        return max(0.05, min(min(wakes) - now, idle_poll))

    def _spec(self, generation: int | None, body: Mapping[str, Any]) -> PolicySpec:
        """The parsed spec, re-parsed only when the generation moves (the engine caches per spec object)."""
        if self._parsed is None or self._parsed[0] != generation or generation is None:
            self._parsed = (generation, parse_spec(dict(body.get("spec") or {})))
        return self._parsed[1]

    async def _close_all(self) -> None:
        await self._forget_departed(set())

    async def _forget_departed(self, keep: set[str]) -> None:
        for name in [n for n in self.states if n not in keep]:
            await self.states.pop(name).close()
            metrics.forget_target(self.namespace, self.name, name)

    async def _endpoint(self, spec: PolicySpec, pod: PodInfo) -> Endpoint:
        if self.fixed_endpoint is not None:
            return self.fixed_endpoint
        conn = spec.connection
        user = password = source = None
        if conn.credentials_secret is not None and self.secrets is not None:
            creds = await self.secrets.credentials(self.namespace, conn.credentials_secret)
            user, password = creds.username, creds.password
            source = f"Secret {conn.credentials_secret.name}"
        elif conn.credentials_secret is None:
            raise CredentialsError(
                ConditionReason.CREDENTIALS_NOT_CONFIGURED,
                "spec.connection.credentialsSecret is required for the central controller",
            )
        assert pod.pod_ip is not None  # select_targets only returns pods with an IP
        return Endpoint(
            pod.pod_ip, conn.port, conn.database, conn.ssl_mode.value, user, password, source, conn.require_auth.value
        )

    def _joining(self, spec: PolicySpec) -> float:
        """How early a target due by the gap may join a pass: at most half the gap, and never so early that it
        is observed twice within min_delay (its previous pass began a gap before its due time)."""
        gap = spec.observation_gap()
        return max(0.0, min(gap - self.settings.min_delay, gap / 2))

    def _backoff(self, state: TargetState, interval: float) -> float:
        return self.settings.retry_delay(state.failures, interval)

    async def _evaluate(
        self, state: TargetState, spec: PolicySpec, endpoint: Endpoint, interval: float
    ) -> TargetUpdate:
        pod = state.pod
        if state.endpoint != endpoint:
            await state.drop_connection()  # address or credentials changed: reconnect
            state.endpoint = endpoint
        if state.enforcer is None:
            state.enforcer = self.make_enforcer(endpoint)
        started = self.clock()
        bound = structlog.contextvars.bound_contextvars(policy=self.name, namespace=self.namespace, pod=pod.name)
        try:
            with bound:
                # Its own connection first, then a shared slot: a wedged server never holds slots others need.
                async with state.enforcer.connected(), self.concurrency:
                    report, next_in = await state.enforcer.evaluate(
                        spec,
                        policy=self.policy_key,
                        target=f"{endpoint.host}:{endpoint.port}",
                        before_write=self._write_ahead(pod),
                        check=self._server_check(pod),
                    )
        except CycleInterrupted as exc:  # failed part way: what PostgreSQL accepted until then is still reported
            await self._failed(state, interval, exc)
            self._report_actions(pod, exc.report, self.clock() - started, completed=False)
            self._note_privileges(state, exc.report)
            return TargetUpdate(pod.name, pod.pod_ip, self.enforcer_kind, report=exc.report, error=str(exc)[:1000])
        except Exception as exc:  # every engine failure is a per-target report, never a crash
            if isinstance(exc, AuthenticationFailed):
                self._forget_credentials(spec)
            await self._failed(state, interval, exc)
            return TargetUpdate(pod.name, pod.pod_ip, self.enforcer_kind, error=str(exc)[:1000])
        state.failures = 0
        gap = spec.observation_gap()  # interval, or the shortest threshold: no session crosses unseen
        state.regular = next_in is None
        if next_in is None:
            # From the start of the pass, not of this evaluation (which waited its turn at the semaphore):
            # targets due together stay together, so the next pass is again one step, not a trickle of many.
            state.next_due = (state.batch.started if state.batch is not None else started) + gap
        else:
            floor = self.settings.crossing_floor(report.duration_seconds)
            state.next_due = started + min(gap, max(floor, next_in))
        self._report_actions(pod, report, self.clock() - started)
        self._note_privileges(state, report)
        return TargetUpdate(pod.name, pod.pod_ip, self.enforcer_kind, report=report)

    def _server_check(self, pod: PodInfo) -> ServerCheck | None:
        check = self.check_pod
        if check is None or self.fixed_endpoint is not None:
            return None

        async def confirm() -> None:
            await check(pod)

        return confirm

    def _forget_credentials(self, spec: PolicySpec) -> None:
        """A refused login: the cached Secret may hold a password rotated since (in PostgreSQL first, the
        Secret after); the next attempt reads the Secret again instead of waiting out the cache."""
        ref = spec.connection.credentials_secret
        if ref is not None and self.secrets is not None:
            self.secrets.invalidate(self.namespace, ref.name)

    def _note_privileges(self, state: TargetState, report: CycleReport) -> None:
        """One Warning Event when the set of missing grants on a target changes to a non-empty one.

        Never one per cycle: a role without pg_signal_backend would otherwise post an Event every interval
        on every target, forever. The target's error and the Degraded condition carry it meanwhile (status).
        """
        missing = tuple(sorted(report.missing_privileges))
        if missing == state.missing_privileges:
            return
        state.missing_privileges = missing
        message = privilege_error(report)
        if message is None:
            log.info("grants now sufficient", policy=self.name, namespace=self.namespace, pod=state.pod.name)
            return
        log.warning("insufficient privileges", policy=self.name, pod=state.pod.name, missing=list(missing))
        text = f"pod {state.pod.name}: missing {', '.join(missing)}: {message}"
        self.post_event(PolicyEvent("Warning", EventReason.INSUFFICIENT_PRIVILEGES, text[:1000]))

    def _write_ahead(self, pod: PodInfo) -> WriteAhead:
        """Status records `autovacuum.written` before the engine's ALTER SYSTEM, not after: an operator killed
        in between still leaves the record its successor releases (a record whose value the file does not
        hold is released as 'absent': nothing is reset)."""

        async def record(value: int) -> None:
            update = TargetUpdate(pod.name, pod.pod_ip, self.enforcer_kind, writing=value)
            await self.write_status([update], sorted(self.states), None, True)

        return record

    async def _failed(self, state: TargetState, interval: float, exc: Exception) -> None:
        """Back off, drop the connection (the next attempt reconnects), count and log the failure."""
        state.failures += 1
        state.next_due = self.clock() + self._backoff(state, interval)
        state.regular = False
        await state.drop_connection()
        metrics.record_error(self.namespace, self.name, state.pod.name)
        log.warning("target failed", policy=self.name, namespace=self.namespace, pod=state.pod.name, error=str(exc))

    def _report_actions(self, pod: PodInfo, report: CycleReport, seconds: float, *, completed: bool = True) -> None:
        """Metrics and Events for what a cycle did (complete or interrupted): every accepted signal counts."""
        metrics.record_cycle(self.namespace, self.name, pod.name, report, seconds, completed=completed)
        for event in events_for_cycle(pod.name, report, max_pids=self.settings.event_max_pids):
            self.post_event(event)


def _written_by_other(status: Mapping[str, Any] | None, pod: str, kind: str) -> bool:
    """Whether the policy's status entry for `pod` was last written by the other kind of enforcer."""
    for target in (status or {}).get("targets") or []:
        if isinstance(target, Mapping) and target.get("pod") == pod:
            return target.get("enforcer") not in (None, kind)
    return False


async def wait_for_work(delay: float, tasks: Iterable[asyncio.Task[Any]], stop: Awaitable[Any]) -> None:
    """Sleep up to `delay`, waking early when every evaluation in flight has landed or `stop` completes.

    Not at the first one that lands: with 200 targets that was ~200 steps per pass, each O(targets)
    (selection, status diff). `delay` (PolicyWorker.step) is short enough for whatever falls due meanwhile.
    """
    waiters = [asyncio.ensure_future(stop)]
    pending = list(tasks)
    if pending:
        waiters.append(asyncio.ensure_future(asyncio.wait(pending)))  # cancelling wait() leaves the tasks be
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
