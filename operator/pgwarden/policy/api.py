"""The API's words in one place: coordinates, condition types and reasons, Event reasons, skip reasons.

Users, alerts and other tools match on these strings (`kubectl wait --for=condition=Ready`, an alert on
reason `InsufficientPrivileges`, a script reading `skipped[].reason`), so they are a contract: spread over
modules as literals they drift. Every layer imports them from here (the policy layer imports nothing
that talks to a server, so the engine and the controller both may).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

# -- API coordinates --------------------------------------------------------------------------------
GROUP: Final = "pgwarden.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "PostgresPolicy"
PLURAL: Final = "postgrespolicies"
SINGULAR: Final = "postgrespolicy"
SHORT_NAME: Final = "pgpolicy"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# -- labels, annotations, finalizer -----------------------------------------------------------------
FINALIZER: Final = f"{GROUP}/finalizer"
ENFORCER_ANNOTATION: Final = f"{GROUP}/enforcer"
"""`pgwarden.dev/enforcer: sidecar` on a pod hands it to its sidecar; the controller skips it."""
CREDENTIALS_LABEL: Final = f"{GROUP}/credentials"
"""Only Secrets labelled `pgwarden.dev/credentials: "true"` are read for credentials."""

# -- conditions -------------------------------------------------------------------------------------
ConditionStatus = Literal["True", "False", "Unknown"]


class ConditionType(StrEnum):
    READY = "Ready"
    """Every target was evaluated in its last cycle."""
    DEGRADED = "Degraded"
    """Some target is failing, or the policy cannot be enforced as written."""


class ConditionReason(StrEnum):
    TARGETS_EVALUATED = "TargetsEvaluated"
    NO_TARGETS = "NoTargets"
    TARGETS_PENDING = "TargetsPending"
    TARGET_ERRORS = "TargetErrors"
    INVALID_SPEC = "InvalidSpec"
    INSUFFICIENT_PRIVILEGES = "InsufficientPrivileges"
    AUTOVACUUM_CONFLICT = "AutovacuumConflict"
    CREDENTIALS_NOT_CONFIGURED = "CredentialsNotConfigured"
    CREDENTIALS_SECRET_NOT_FOUND = "CredentialsSecretNotFound"  # noqa: S105 - a reason, not a secret
    CREDENTIALS_SECRET_NOT_LABELLED = "CredentialsSecretNotLabelled"  # noqa: S105 - a reason, not a secret
    CREDENTIALS_KEY_MISSING = "CredentialsKeyMissing"
    CREDENTIALS_INVALID = "CredentialsInvalid"
    CREDENTIALS_FORBIDDEN = "CredentialsForbidden"
    CREDENTIALS_UNAVAILABLE = "CredentialsUnavailable"


# -- Events -----------------------------------------------------------------------------------------
EventType = Literal["Normal", "Warning"]


class EventReason(StrEnum):
    SESSIONS_TERMINATED = "SessionsTerminated"
    QUERIES_CANCELLED = "QueriesCancelled"
    AUTOVACUUM_CAPPED = "AutovacuumCapped"
    AUTOVACUUM_LEFT_BEHIND = "AutovacuumLeftBehind"
    DRY_RUN = "DryRun"
    INSUFFICIENT_PRIVILEGES = "InsufficientPrivileges"


# -- why a chosen session was left alone (`skipped[].reason`) ---------------------------------------
class SkipReason(StrEnum):
    MAX_ACTIONS = "maxActionsPerCycle"
    MAX_FRACTION = "maxFractionPerCycle"
    GONE = "gone"
    """The backend ended (or its pid now belongs to another backend) between observation and action."""
    STATE_CHANGED = "stateChanged"
    """The session changed state since it was observed, so the rule's verdict no longer applies."""
    PERMISSION_DENIED = "permissionDenied"
    """PostgreSQL refused the signal (SQLSTATE 42501); also listed in `errors`."""
    NOT_PERMITTED = "notPermitted"
    """A superuser's session while the engine's role is not a superuser: never a candidate."""
    FAILED = "error"
    """Signalling failed for another reason; the message is in `errors`."""
    NO_LONGER_BLOCKING = "noLongerBlocking"
    """Chosen by a `blocking` rule, but by the time of the signal it blocked none of the sessions seen waiting."""


# -- why `pgwarden drain` left a session on the database alone (`untouched[].reason`) -------------------
class Untouched(StrEnum):
    """Why drain leaves a session on the database alone (`untouched[].reason`)."""

    OWN = "pgwarden"
    """pgwarden's own session (the engine's role, application_name starting with pgwarden), any process."""
    EXCLUDED = "excluded"
    """A user given with --exclude-user."""
    NOT_PERMITTED = SkipReason.NOT_PERMITTED.value
    """PostgreSQL would refuse the signal (a superuser's session, another role's without pg_signal_backend)."""
    NOT_CLIENT_BACKEND = "notClientBackend"
    """A walsender (replication), an autovacuum or parallel worker...: never a client session."""
    NOT_VISIBLE = "notVisible"
    """The role lacks pg_read_all_stats: the session's details are hidden, so it is never acted on."""


# -- who enforces a pod -----------------------------------------------------------------------------
class EnforcerKind(StrEnum):
    CONTROLLER = "controller"
    SIDECAR = "sidecar"


# -- policy reports (openreports.io) ----------------------------------------------------------------
# pgwarden writes one namespaced `Report` per policy when the openreports CRDs are installed, for the tools
# platform teams already read policy findings in (Policy Reporter, Kyverno's report views).
REPORTS_GROUP: Final = "openreports.io"
REPORTS_VERSION: Final = "v1alpha1"
REPORTS_API_VERSION: Final = f"{REPORTS_GROUP}/{REPORTS_VERSION}"
REPORT_KIND: Final = "Report"
REPORTS_PLURAL: Final = "reports"
REPORT_SOURCE: Final = "pgwarden"
"""`source` of every Report and result pgwarden writes: how report readers tell its findings apart."""
REPORT_POLICY_LABEL: Final = f"{GROUP}/policy"
"""On each Report: the name of the PostgresPolicy it reports on."""
REPORT_OMITTED_ANNOTATION: Final = f"{GROUP}/omitted-results"
"""On a Report too large to hold every result: how many were left out (`summary` still counts them all)."""


class ReportResult(StrEnum):
    """A result's verdict, as the openreports schema spells it."""

    PASS = "pass"  # noqa: S105 - a verdict, not a password
    """The rule matched no session on this pod in its last evaluation."""
    FAIL = "fail"
    """The rule acted on sessions on this pod in its last evaluation (or, in dry run, would have)."""
    WARN = "warn"
    """The rule chose sessions on this pod but left them all alone (limits, races, refusals: see message)."""
    ERROR = "error"
    """The pod could not be evaluated (unreachable, credentials, missing grants)."""
    SKIP = "skip"
    """The pod is enforced by its sidecar, not by the controller that writes this Report."""
