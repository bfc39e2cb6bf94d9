"""The schema of `PostgresPolicy.status`, as the CRD publishes it.

The controller and the sidecars write the status (pgwarden.controller.status); nothing reads it back
through a model, so it is described here as a schema, not as pydantic models. Two things matter to the
writers: `conditions` and `targets` are list-maps (keyed by type and by pod), so that sidecars applying
their own pod's entry with server-side apply keep each other's; and the engine's autovacuum report and
kopf's bookkeeping keep unknown fields, since their shape is theirs.
"""

from __future__ import annotations

import copy
from typing import get_args

from pgwarden.policy.api import ConditionStatus, EnforcerKind
from pgwarden.policy.openapi import JsonDict, array, boolean, integer, obj, string

LAST_ACTIONS_MAX_ITEMS = 100
"""The schema's bound on `targets[].lastActions`; the controller writes fewer (controller.status)."""

# metav1.Condition's own validation (k8s.io/apimachinery/pkg/apis/meta/v1/types.go).
_CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
_CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

_CONDITION = obj(
    "One condition of the policy, in the standard metav1.Condition shape.",
    {
        "type": string("Condition type, in CamelCase (Ready, Degraded).", max_length=316, pattern=_CONDITION_TYPE),
        "status": string("Whether the condition holds.", enum=get_args(ConditionStatus)),
        "observedGeneration": integer(
            "The metadata.generation the condition was computed for.", format="int64", minimum=0
        ),
        "lastTransitionTime": string("When status last changed.", format="date-time"),
        "reason": string(
            "Why, in CamelCase (TargetsEvaluated, TargetErrors, CredentialsSecretNotFound).",
            min_length=1,
            max_length=1024,
            pattern=_CONDITION_REASON,
        ),
        "message": string("Details for a human.", max_length=32768),
    },
    required=["type", "status", "reason", "message", "lastTransitionTime"],
)

_ACTION = obj(
    "One backend acted on.",
    {
        "rule": string("The session rule or connection limit that selected it."),
        "action": string("terminate (pg_terminate_backend) or cancel (pg_cancel_backend)."),
        "pid": integer("The backend's process id.", format="int64"),
        "user": string("Its role (usename)."),
        "database": string("Its database (datname)."),
        "applicationName": string("Its application_name."),
        "clientAddress": string("Its client_addr; absent for Unix-socket sessions."),
        "state": string("Its pg_stat_activity.state when acted on."),
        "done": boolean("Whether PostgreSQL signalled the backend (false in dryRun or if it was gone)."),
    },
)

_TARGET = obj(
    "What the last cycle saw and did on one PostgreSQL server.",
    {
        "pod": string("Name of the targeted pod."),
        "podIP": string("The pod IP the controller connected to."),
        "enforcer": string(
            "Who enforces on this pod: controller (the central operator) or sidecar (the pgwarden container in "
            "the pod, when the pod is annotated pgwarden.dev/enforcer=sidecar).",
            enum=[kind.value for kind in EnforcerKind],
        ),
        "serverVersion": string("The server's version (server_version)."),
        "backends": obj(
            "Backends by pg_stat_activity.backend_type (client backend, autovacuum worker...).",
            values=integer(None, format="int64"),
        ),
        "clientStates": obj("Client backends by pg_stat_activity.state.", values=integer(None, format="int64")),
        "lastCycleTime": string("When the last cycle on this server finished.", format="date-time"),
        "lastActionTime": string("When a cycle last cancelled or terminated something here.", format="date-time"),
        "lastActions": array(
            "The backends the last acting cycle cancelled or terminated (or would have, in dryRun): at most 20, "
            "the newest. Dropped first when the status nears its size budget (totals and metrics keep the counts).",
            _ACTION,
            max_items=LAST_ACTIONS_MAX_ITEMS,
        ),
        "autovacuum": obj(
            "The autovacuum cap as the engine reports it (setting, workers, cancellations), and what pgwarden wrote.",
            {
                "written": obj(
                    "The autovacuum_max_workers value pgwarden wrote here with ALTER SYSTEM (recorded just before "
                    "the write), kept until released: the deletion of the policy, the removal of spec.autovacuum "
                    "or the deselection of the pod resets exactly this value, if postgresql.auto.conf still holds it.",
                    {
                        "value": integer("The value written.", format="int32"),
                        "time": string("When it was written.", format="date-time"),
                    },
                    required=["value"],
                ),
            },
            preserve_unknown_fields=True,
        ),
        "skipped": obj(
            "Sessions the last cycle chose but left alone, counted by reason (maxActionsPerCycle, "
            "maxFractionPerCycle, notPermitted, gone, stateChanged, permissionDenied, error).",
            values=integer(None, format="int64"),
        ),
        "skippedReason": string("Why this enforcer leaves the pod alone (another enforcer owns it)."),
        "error": string(
            "Why the last cycle failed on this server (unreachable, authentication, timeout), or the grant the "
            "engine's role lacks (starting with 'InsufficientPrivileges: '). Cut to 1,000 characters, fewer when "
            "the status nears its size budget."
        ),
    },
    required=["pod"],
)

_TOTALS = obj(
    "What pgwarden did since the policy was created (dryRun actions not counted).",
    {
        "actions": integer("All cancellations and terminations, autovacuum workers included.", format="int64"),
        "terminated": integer("Backends terminated (pg_terminate_backend).", format="int64"),
        "cancelled": integer("Queries cancelled (pg_cancel_backend).", format="int64"),
        "autovacuumCancelled": integer("Autovacuum workers cancelled above the cap.", format="int64"),
    },
)


def status_schema() -> JsonDict:
    """`status` as the API server validates it (a fresh copy: callers may change it)."""
    schema = obj(
        "What pgwarden saw and did, written by the controller and by sidecars (each sidecar writes only its own "
        "pod's entry of targets).",
        {
            "observedGeneration": integer("The metadata.generation of the spec the status describes.", format="int64"),
            "conditions": array(
                "Ready (every target evaluated in the last cycle) and Degraded (some target failing, or the policy "
                "unusable), with a reason and a message.",
                _CONDITION,
                list_map_keys=["type"],
            ),
            "targetCount": integer("Pods this policy is enforced on now (skipped pods not counted).", format="int32"),
            "readyTargets": integer("Targets whose last cycle ran without error.", format="int32"),
            "targets": array(
                "One entry per targeted pod, written by whichever enforcer owns that pod.",
                _TARGET,
                list_map_keys=["pod"],
            ),
            "totals": _TOTALS,
            "writes": obj(
                "The id of each pgwarden writer's last status write (key `controller`, or `sidecar/POD`): a write "
                "whose answer was lost in an API outage is recognised when it landed anyway, never applied twice.",
                values=string("An opaque write id.", max_length=64),
            ),
            "kopf": obj("Bookkeeping of the kopf framework the controller runs on.", preserve_unknown_fields=True),
        },
    )
    return copy.deepcopy(schema)
