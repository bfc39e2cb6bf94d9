"""pgwarden's tunables in one documented, immutable object, and the one retry policy built on them.

Every knob that shapes timing or load (how often a target may be evaluated, how failures back off, how
many evaluations run at once, how often the status is refreshed) lives here, read once at start-up from
the environment (`PGWARDEN_<FIELD>`, e.g. `PGWARDEN_CONCURRENCY=64`) and command-line flags, then passed
down: the CLI loop, the sidecar and the controller all see the same values and the same backoff rule.

This module is the lowest layer (see the import-linter contracts in pyproject.toml): it imports nothing
of pgwarden, so the engine, the enforcement loop and every front end may import it.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "PGWARDEN_"


def _knob(default: float, doc: str, *, minimum: float = 0.0, integer: bool = False) -> Any:
    """A settings field with its documentation and bounds attached (read by `from_env` and `describe`)."""
    return field(default=default, metadata={"doc": doc, "minimum": minimum, "integer": integer})


@dataclass(frozen=True)
class Settings:
    """Timing and load tunables. Defaults suit a cluster of a few hundred PostgreSQL pods."""

    min_delay: float = _knob(
        1.0,
        "The first retry delay after a failure (retries double from it), and the status writer's first retry.",
        minimum=0.01,
    )
    wake_floor: float = _knob(
        0.02,
        "Seconds between two evaluations of one target at the least when the earlier one saw a session cross "
        "a threshold then; never less than 4 times the earlier evaluation's duration either, so a burst of "
        "crossings costs the server at most a fifth of a connection's time.",
        minimum=0.001,
    )
    max_backoff: float = _knob(
        300.0,
        "Seconds a failing target waits at most before its next attempt (retries double from min_delay and "
        "never wait longer than the policy's interval either).",
        minimum=0.01,
    )
    idle_poll: float = _knob(
        2.0,
        "Seconds a policy's loop sleeps at most between looks at the pods index, so a new pod is seen soon.",
        minimum=0.01,
    )
    invalid_spec_poll: float = _knob(
        10.0,
        "Seconds between looks at a policy whose spec is invalid (it is enforced nowhere meanwhile).",
        minimum=0.01,
    )
    concurrency: int = _knob(
        32,
        "Evaluations the controller runs at once over all policies and targets (each holds one connection busy).",
        minimum=1,
        integer=True,
    )
    sidecar_concurrency: int = _knob(
        4, "Evaluations a sidecar runs at once on its own server (one per policy).", minimum=1, integer=True
    )
    sidecar_poll: float = _knob(
        5.0, "Seconds between a sidecar's reads of its own pod and of its namespace's policies.", minimum=0.1
    )
    status_heartbeat: float = _knob(
        60.0,
        "Seconds after which a status that says nothing new is written anyway (refreshing lastCycleTime and the "
        "process counts); a change is written at once.",
        minimum=1.0,
    )
    status_write_attempts: int = _knob(
        8,
        "Status write conflicts (sidecars, another pass got there first) retried at once; beyond that the writer "
        "backs off with jitter, up to 1 s, and keeps trying: it never gives up and drops the step's totals.",
        minimum=1,
        integer=True,
    )
    release_timeout: float = _knob(
        10.0,
        "Seconds a deleted policy's finalizer spends resetting autovacuum_max_workers on each target before it "
        "gives up and lets the deletion proceed.",
        minimum=0.1,
    )
    secret_cache_ttl: float = _knob(
        30.0, "Seconds a credentials Secret is cached: a rotated password is used within this time.", minimum=0.0
    )
    api_timeout: float = _knob(
        10.0,
        "Seconds any one Kubernetes API request of pgwarden's own (status, Secrets, pods, Events) may take before it "
        "is abandoned; kopf's watches have their own bounds.",
        minimum=0.1,
    )
    status_retry_max: float = _knob(
        30.0,
        "Seconds at most between two attempts to write a policy's status while the API server fails; attempts "
        "back off from min_delay with full jitter. Enforcement never waits for them.",
        minimum=0.1,
    )
    secret_stale_max: float = _knob(
        900.0,
        "Seconds a credentials Secret read earlier may still be used while the API server cannot be asked again "
        "(stalled, restarting): enforcement goes on with the last good credentials for this long.",
        minimum=0.0,
    )
    loop_stall: float = _knob(
        120.0,
        "Seconds without a completed step after which a policy's loop counts as stalled: /healthz then fails, "
        "so the kubelet restarts the replica.",
        minimum=1.0,
    )
    peering_settle: float = _knob(
        5.0,
        "Seconds a peered replica waits before a policy's loop acts, counted from the later of its own peering "
        "record showing and the loop's start: longer than a peer needs to see the record and pause (the API "
        "watch's latency) plus the time a pausing replica needs to cancel its evaluation in flight.",
        minimum=0.0,
    )
    sidecar_release_grace: float = _knob(
        90.0,
        "Seconds the controller leaves a pod alone after taking it back from its sidecar (annotation "
        "pgwarden.dev/enforcer: sidecar removed). Longer than handover_grace on purpose: a sidecar that cannot "
        "read its pod (API server stalled) goes on enforcing with its last read for this long, less one "
        "evaluation bound, so an API stall does not stop it and two enforcers never act at once.",
        minimum=0.0,
    )
    handover_grace: float = _knob(
        15.0,
        "Seconds an enforcer leaves a pod alone after taking it over from the other kind (annotation "
        "pgwarden.dev/enforcer added or removed), and a sidecar its pod after it starts or first sees the "
        "annotation: longer than the previous enforcer needs to notice (sidecar_poll, idle_poll) and to end "
        "the evaluation in flight.",
        minimum=0.0,
    )
    policy_reports: int = _knob(
        1,
        "1: the controller keeps an openreports.io Report per policy when those CRDs are installed (detected at "
        "start); 0: never (also `pgwarden run --no-policy-reports`).",
        minimum=0,
        integer=True,
    )
    event_max_pids: int = _knob(
        20, "Process ids listed in one Event's message at most (the rest are counted).", minimum=1, integer=True
    )

    def retry_delay(self, failures: int, interval: float) -> float:
        """Seconds before the next attempt after `failures` consecutive failures: min_delay, doubling each time,
        never longer than `interval` nor max_backoff (and never shorter than min_delay)."""
        doubling = self.min_delay * 2.0 ** min(max(0, failures - 1), 30)
        return max(self.min_delay, min(interval, self.max_backoff, doubling))

    def api_retry_delay(self, failures: int) -> float:
        """Seconds before the next attempt of a background API write (status, policy report) after `failures`
        consecutive failures: full jitter over a cap that doubles from min_delay up to status_retry_max, so
        writers that failed together do not retry together."""
        cap = min(self.status_retry_max, self.min_delay * 2.0 ** min(failures - 1, 20))
        return random.uniform(self.min_delay / 2, max(self.min_delay / 2, cap))  # noqa: S311 - jitter, not a secret

    def crossing_floor(self, duration: float) -> float:
        """Seconds after an evaluation that took `duration` before a wake-up for a crossing it saw: wake_floor,
        or 4 times the duration when longer (a server where one look takes 50 ms is looked at every 200 ms at
        most, however many sessions cross)."""
        return max(self.wake_floor, 4.0 * duration)

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (command-line flags that were given) applied and checked."""
        return _checked(dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Defaults overridden by `PGWARDEN_<FIELD>` variables; a malformed or out-of-range value is an error."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or not raw.strip():
                continue
            try:
                values[f.name] = int(raw) if f.metadata["integer"] else float(raw)
            except ValueError:
                kind = "an integer" if f.metadata["integer"] else "a number"
                raise SettingsError(f"{ENV_PREFIX}{f.name.upper()}: must be {kind}, got {raw!r}") from None
        return _checked(cls(**values))

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, documentation) of every field, for docs and `--help`."""
        return [
            (ENV_PREFIX + f.name.upper(), f"{f.default:g}", str(f.metadata["doc"])) for f in dataclasses.fields(cls)
        ]


class SettingsError(ValueError):
    """A tunable out of range or not a number; the message names the variable or flag."""


def _checked(settings: Settings) -> Settings:
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value < f.metadata["minimum"]:
            raise SettingsError(
                f"{ENV_PREFIX}{f.name.upper()}: must be at least {f.metadata['minimum']:g}, got {value}"
            )
    return settings


DEFAULTS = Settings()
"""The settings when nothing is configured (library callers, tests)."""
