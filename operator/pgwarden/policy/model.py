"""Typed models of `PostgresPolicy.spec` (pgwarden.dev/v1alpha1), and the one source of its CRD.

Field names are the CRD's camelCase; Python code uses snake_case attributes. Unknown fields are
errors, so a typo in a policy is refused instead of silently meaning "no rule".

`make crd` writes manifests/crd/ from these models (pgwarden.policy.crd): types, enums, bounds and
defaults as pydantic sees them; descriptions as `kubectl explain` shows them (a field's `description`,
else its model's docstring); and, through `crd(...)` (pgwarden.policy.openapi), what only the API
server checks: CEL rules with the messages users read, the length bounds those rules need, list-map
keys. Each CEL rule has a Python twin here (a validator) that gives the same message; the corpus under
tests/data/policies/ goes to both the model and a real API server to prove it.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from pgwarden.policy import durations
from pgwarden.policy.durations import format_duration, parse_duration
from pgwarden.policy.openapi import CelRule, crd

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PREFIX_LENGTH = re.compile(r"0|[1-9][0-9]{0,2}")

# -- the CEL rules and their messages (each has a Python twin below that says the same) ---------------
_GO_DURATION = r"^[+]?(0|(([0-9]+([.][0-9]*)?|[.][0-9]+)(ns|us|µs|μs|ms|s|m|h))+)$"
"""Go's time.ParseDuration grammar without the sign, which CEL's duration() would accept."""
_NOT_A_DURATION = (
    "must be a duration such as 90s, 10m or 1h30m: a number and a unit (ns, us, ms, s, m, h), not negative; "
    "write days as hours (24h)"
)
_NOT_A_CIDR = "is not a CIDR such as '10.0.0.0/8' or an address such as '10.0.0.7'"
_NOT_A_DNS_LABEL = (
    "must be a DNS label: at most 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
)
_NO_AGE = "a session rule needs at least one of stateAge, queryAge, transactionAge, connectionAge, or blocking"

_AGE_RULE = CelRule(
    rule=f"self.matches('{_GO_DURATION}') && duration(self) >= duration('0s')",
    message=_NOT_A_DURATION,
)
_INTERVAL_RULE = CelRule(
    rule=f"self.matches('{_GO_DURATION}') && duration(self) >= duration('1s')",
    message_expression=(
        f"self.matches('{_GO_DURATION}')"
        " ? 'must be at least 1s: interval is the longest gap between two reads of pg_stat_activity"
        " (known threshold crossings get a read of their own), and reading every target more often than"
        " once a second only loads the server'"
        f" : '{_NOT_A_DURATION}'"
    ),
    message=_NOT_A_DURATION,
)
_CIDR_RULE = CelRule(
    rule="isCIDR(self) || isIP(self)",
    message_expression=f'"\'" + self + "\' {_NOT_A_CIDR}"',
    message=_NOT_A_CIDR,
)
_DNS_LABEL_RULE = CelRule(rule=f"self.matches('{DNS_LABEL.pattern}')", message=_NOT_A_DNS_LABEL)

Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]
"""A Go-style duration string in YAML, a timedelta in Python."""
Age = Annotated[Duration, Field(json_schema_extra=crd(max_length=durations.MAX_LENGTH, rules=[_AGE_RULE]))]
"""A session age threshold: any duration, 0s included."""


def _check_cidr(value: str) -> str:
    """Accept what the CRD's CEL `isCIDR(self) || isIP(self)` accepts (Go's net/netip): no netmask form
    (`/255.0.0.0`), no leading zero in the prefix length, no IPv6 zone, no IPv4-mapped IPv6 address."""
    address, slash, prefix = value.partition("/")
    try:
        ip = ipaddress.ip_address(address)
        if "%" in address or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None):
            raise ValueError(value)
        if slash and not _PREFIX_LENGTH.fullmatch(prefix):
            raise ValueError(value)
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} {_NOT_A_CIDR}") from None
    return value


def _check_dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.fullmatch(value):  # fullmatch: `$` would let a trailing newline in
        raise ValueError(f"{value!r} {_NOT_A_DNS_LABEL}")
    return value


def _no_strings_or_booleans(value: object) -> object:
    """The API server takes only JSON numbers for integer fields (5432, or 5432.0), never "5432" or true."""
    if isinstance(value, str | bool):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}")
    return value


Cidr = Annotated[
    str,
    AfterValidator(_check_cidr),
    Field(
        description="An IPv4 or IPv6 CIDR (127.0.0.0/8) or address (127.0.0.1).",
        json_schema_extra=crd(max_length=64, rules=[_CIDR_RULE]),  # 64: the longest IPv6 CIDR has 43 characters
    ),
]
Integer = Annotated[int, BeforeValidator(_no_strings_or_booleans)]
RuleName = Annotated[
    str, AfterValidator(_check_dns_label), Field(json_schema_extra=crd(max_length=63, rules=[_DNS_LABEL_RULE]))
]
Pattern = Annotated[str, Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True, use_enum_values=False
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        """The API server prunes null fields (then applies defaults); the model reads them the same way."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class EnforcementAction(StrEnum):
    ENFORCE = "enforce"
    DRY_RUN = "dryRun"


class SessionAction(StrEnum):
    TERMINATE = "terminate"
    CANCEL = "cancel"


class SessionState(StrEnum):
    """A pg_stat_activity.state value."""

    ACTIVE = "active"
    IDLE = "idle"
    IDLE_IN_TRANSACTION = "idle in transaction"
    IDLE_IN_TRANSACTION_ABORTED = "idle in transaction (aborted)"
    FASTPATH = "fastpath function call"
    DISABLED = "disabled"


class GroupBy(StrEnum):
    USER = "user"
    DATABASE = "database"
    APPLICATION_NAME = "applicationName"
    CLIENT_ADDRESS = "clientAddress"


class SslMode(StrEnum):
    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class RequireAuth(StrEnum):
    """libpq's `require_auth`: the authentication methods the server may ask for before it gets a password."""

    SCRAM_SHA_256 = "scram-sha-256"
    MD5 = "md5"
    PASSWORD = "password"  # noqa: S105 - the name of libpq's cleartext method, not a password
    ANY = "any"
    """No restriction: whatever the server asks for (libpq's behaviour without require_auth)."""


class LabelSelectorRequirement(_Model):
    """One requirement on one pod label."""

    model_config = ConfigDict(
        json_schema_extra=crd(
            rules=[
                CelRule(
                    rule="!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
                    message_expression="'operator ' + self.operator + ' needs at least one value'",
                    message="operators In and NotIn need at least one value",
                ),
                CelRule(
                    rule="!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || "
                    "size(self.values) == 0",
                    message_expression="'operator ' + self.operator + ' takes no values'",
                    message="operators Exists and DoesNotExist take no values",
                ),
            ]
        )
    )

    key: str = Field(min_length=1, description="The pod label the requirement tests.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In: the label's value is one of values. NotIn: the label is absent or its value is none of "
        "values. Exists: the pod has the label. DoesNotExist: it does not."
    )
    values: list[str] = Field(
        default_factory=list,
        description="The label values In and NotIn compare with; empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Model):
    """A Kubernetes label selector; only the operator uses it (the CLI ignores it)."""

    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Label values a pod must all carry to be targeted."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        description="Label requirements a pod must all meet to be targeted (ANDed with matchLabels).",
    )

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes semantics: every matchLabels pair and every expression must hold."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


class CredentialsSecret(_Model):
    name: str = Field(min_length=1, description="Name of the Secret.")
    username_key: str = Field(
        default="username", min_length=1, description="Key of the Secret whose value is the PostgreSQL role name."
    )
    password_key: str = Field(
        default="password", min_length=1, description="Key of the Secret whose value is that role's password."
    )


class ConnectionSettings(_Model):
    """How the operator reaches each target pod; the CLI and sidecar take a DSN instead."""

    port: Integer = Field(
        default=5432,
        ge=1,
        le=65535,
        description="TCP port PostgreSQL listens on in each targeted pod (its `port` setting).",
    )
    database: str = Field(
        default="postgres",
        min_length=1,
        description="Database the controller connects to. pg_stat_activity lists the sessions of every database "
        "from any one of them, so it only has to exist and admit the login.",
    )
    ssl_mode: SslMode = Field(
        default=SslMode.PREFER,
        description="libpq sslmode of the controller's connections: disable, allow, prefer (TLS when the server "
        "offers it), require, verify-ca or verify-full. Use verify-full in production: anything weaker lets "
        "whatever answers at podIP:port pose as the server.",
    )
    require_auth: RequireAuth = Field(
        default=RequireAuth.SCRAM_SHA_256,
        description="Authentication methods the server may ask for before the controller sends the password "
        "(libpq require_auth): scram-sha-256 (the default; with TLS, channel binding when the server offers it), "
        "md5, password (cleartext), or any. A server asking for a weaker method gets no password, and the "
        "target's error names the method it refused.",
    )
    credentials_secret: CredentialsSecret | None = Field(
        default=None,
        description="Secret in this namespace holding the PostgreSQL role and password the controller logs in "
        "with. The role needs pg_signal_backend (or superuser) to cancel or terminate other roles' backends, and "
        "ALTER SYSTEM on autovacuum_max_workers to cap autovacuum. The central controller enforces nothing "
        "without it (the policy reports why); a sidecar ignores it and logs in with its own credentials.",
    )


class Limits(_Model):
    """Blast-radius guard: caps on how much one cycle may do to one target."""

    max_actions_per_cycle: Integer = Field(
        default=50,
        ge=1,
        description="At most this many cancellations and terminations per server per cycle.",
    )
    max_fraction_per_cycle: float = Field(
        default=0.5,
        gt=0,
        le=1,
        strict=True,  # strict: ints yes, "0.5" no
        description="At most this fraction of the server's client backends may be cancelled or terminated in one "
        "cycle, in (0, 1], rounded down (one action per cycle is always allowed); 1 allows all of them (draining "
        "a database).",
    )


class SessionFilters(_Model):
    """Which sessions a rule is about; empty lists mean any. Globs are fnmatch-style, case-sensitive."""

    users: list[Pattern] = Field(
        default_factory=list,
        description="Role names (pg_stat_activity.usename) or globs a session must match; empty means any.",
    )
    databases: list[Pattern] = Field(
        default_factory=list,
        description="Database names (pg_stat_activity.datname) or globs a session must match; empty means any.",
    )
    application_names: list[Pattern] = Field(
        default_factory=list,
        description="application_name values (pg_stat_activity.application_name) or globs a session must match; "
        "empty means any.",
    )
    client_addresses: list[Cidr] = Field(
        default_factory=list,
        max_length=32,
        description="Client addresses (pg_stat_activity.client_addr) as CIDRs or single IPs a session must match; "
        "empty means any. A Unix-socket session has no address and matches only when this list is empty.",
    )


class Exclude(_Model):
    """Sessions no rule may touch, on top of the built-in protections."""

    users: list[Pattern] = Field(
        default_factory=list, description="Role names (pg_stat_activity.usename) or globs never touched."
    )
    databases: list[Pattern] = Field(
        default_factory=list, description="Database names (pg_stat_activity.datname) or globs never touched."
    )
    application_names: list[Pattern] = Field(
        default_factory=list,
        description="application_name values (pg_stat_activity.application_name) or globs never touched.",
    )


class Blocking(_Model):
    """The session must block others: hold a lock that at least minBlocked sessions have waited minWait for."""

    min_blocked: Integer = Field(
        ge=1,
        description="Sessions that must be waiting behind this one for a lock (pg_blocking_pids), directly or "
        "queued behind another waiter.",
    )
    min_wait: Age = Field(
        description="How long each of those sessions must have waited for its lock (pg_locks.waitstart), as a Go "
        "duration."
    )


class SessionRule(SessionFilters):
    """One session rule. A session matches when it passes every filter (an empty filter passes any session), is
    in one of states, and is older than every age given (at least one age is required)."""

    model_config = ConfigDict(
        json_schema_extra=crd(
            rules=[
                CelRule(
                    rule="has(self.stateAge) || has(self.queryAge) || has(self.transactionAge) || "
                    "has(self.connectionAge) || has(self.blocking)",
                    message=_NO_AGE,
                )
            ]
        )
    )

    name: RuleName = Field(description="Rule name, unique in this policy; reported in status, Events and metrics.")
    action: SessionAction = Field(
        description="terminate closes the backend with pg_terminate_backend (the client is disconnected); cancel "
        "stops its running query with pg_cancel_backend (the session stays)."
    )
    states: list[SessionState] = Field(
        default_factory=list,
        description="pg_stat_activity.state values the rule applies to; empty means any state.",
    )
    state_age: Age | None = Field(
        default=None,
        description="Match once the session has been in its current state this long "
        "(now - pg_stat_activity.state_change), as a Go duration.",
    )
    query_age: Age | None = Field(
        default=None,
        description="Match once the session's current or last query started this long ago "
        "(now - pg_stat_activity.query_start), as a Go duration.",
    )
    transaction_age: Age | None = Field(
        default=None,
        description="Match once the session's open transaction started this long ago "
        "(now - pg_stat_activity.xact_start), as a Go duration; sessions outside a transaction never match.",
    )
    connection_age: Age | None = Field(
        default=None,
        description="Match once the session has been connected this long (now - pg_stat_activity.backend_start), "
        "as a Go duration; 0s matches every session at once (draining a database).",
    )

    blocking: Blocking | None = Field(
        default=None,
        description="Match only a session that blocks others: at least minBlocked sessions have each waited "
        "minWait for a lock it holds. Only root blockers match (a session itself waiting for a lock never does: "
        "ending it would free nothing while its own blocker stays). With blocking, no age is required.",
    )

    @model_validator(mode="after")
    def _needs_an_age(self) -> SessionRule:
        if self.blocking is None and all(age is None for age in self.ages().values()):
            raise ValueError(_NO_AGE)
        return self

    def ages(self) -> dict[str, timedelta | None]:
        """The age thresholds by pg_stat_activity timestamp column they measure from."""
        return {
            "state_change": self.state_age,
            "query_start": self.query_age,
            "xact_start": self.transaction_age,
            "backend_start": self.connection_age,
        }


class ConnectionLimit(SessionFilters):
    """One connection limit. Sessions matching every filter are grouped by groupBy; each group may keep at most
    max backends."""

    name: RuleName = Field(description="Limit name, unique in this policy; reported in status, Events and metrics.")
    group_by: GroupBy = Field(
        description="The pg_stat_activity column sessions are counted by: user (usename), database (datname), "
        "applicationName (application_name) or clientAddress (client_addr)."
    )
    max: Integer = Field(ge=0, description="Backends each group may hold; 0 terminates every matching session.")
    include_active: bool = Field(
        default=False,
        strict=True,
        description="Whether sessions running a query (state active) may also be terminated to bring the group "
        "under max; by default they are left alone.",
    )


class Autovacuum(_Model):
    max_workers: Annotated[int, Field(ge=1, le=262143), BeforeValidator(_no_strings_or_booleans)] | None = Field(
        default=None,
        description="Set autovacuum_max_workers to this with ALTER SYSTEM and pg_reload_conf(). PostgreSQL 18 "
        "applies it at once (up to autovacuum_worker_slots); earlier versions at their next restart, which "
        "pgwarden never performs. Unset leaves the setting alone.",
    )
    cancel_excess_workers: bool = Field(
        default=False,
        strict=True,
        description="Also cancel (pg_cancel_backend) running autovacuum workers beyond maxWorkers, newest first, "
        "never one preventing wraparound. Needs superuser, or pg_signal_autovacuum_worker on PostgreSQL 18.",
    )


def _unique_names(kind: str, items: list[SessionRule] | list[ConnectionLimit]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{kind} names must be unique; {item.name!r} appears more than once")
        seen.add(item.name)


class PolicySpec(_Model):
    """What pgwarden enforces. Every cycle it reads pg_stat_activity on each targeted server and calls
    pg_cancel_backend or pg_terminate_backend on the backends the rules select, within the limits below."""

    selector: LabelSelector | None = Field(
        default=None,
        description="The pods in this policy's namespace whose PostgreSQL servers are enforced on: Running pods "
        "with a podIP and matching labels. Required so that no policy targets every database by omission; an "
        "explicit empty selector ({}) selects every pod in the namespace.",
        # The one deliberate difference between the model and the CRD: the CLI and the sidecar enforce on the
        # server they are given and ignore selector, so the model lets it be absent.
        json_schema_extra=crd(required=True),
    )
    connection: ConnectionSettings = Field(
        default_factory=ConnectionSettings,
        description="How the central controller logs in to each targeted server (podIP:port). A sidecar ignores "
        "this and connects over localhost or a Unix socket with its own credentials.",
        json_schema_extra=crd(fill_defaults=True),
    )
    interval: Duration = Field(
        default=timedelta(seconds=30),
        description="The longest gap between two evaluations of each target, as a Go duration (30s, 1m, 1h30m). "
        "A target is also observed once per shortest age threshold of the session rules when that is shorter "
        "(so no session crosses unseen), and evaluated exactly when a session it saw crosses one. At least 1s.",
        json_schema_extra=crd(max_length=durations.MAX_LENGTH, rules=[_INTERVAL_RULE]),
    )
    enforcement_action: EnforcementAction = Field(
        default=EnforcementAction.ENFORCE,
        description="enforce calls pg_cancel_backend / pg_terminate_backend and caps autovacuum; dryRun changes "
        "nothing on PostgreSQL and only reports, in status and Events, what it would have done.",
    )
    limits: Limits = Field(
        default_factory=Limits,
        description="Blast-radius guard: how many backends one cycle may cancel or terminate on one server. Both "
        "caps apply; the rest wait for the next cycle.",
        json_schema_extra=crd(fill_defaults=True),
    )
    exclude: Exclude = Field(
        default_factory=Exclude,
        description="Sessions no rule may cancel or terminate, on top of the built-in protections (pgwarden's own "
        "sessions, and every backend that is not a client backend: walsenders, background and autovacuum "
        "workers). Globs are fnmatch-style and case-sensitive.",
    )
    sessions: list[SessionRule] = Field(
        default_factory=list,
        max_length=64,
        description="Rules that cancel the running query of, or terminate, client backends (pg_stat_activity rows "
        "with backend_type 'client backend'), evaluated in order: a session is acted on by the first rule it "
        "matches.",
        json_schema_extra=crd(list_map_keys=["name"]),
    )
    connection_limits: list[ConnectionLimit] = Field(
        default_factory=list,
        max_length=64,
        description="Caps on how many client backends one group of sessions may hold. Sessions above the cap are "
        "terminated (pg_terminate_backend): idle ones first, longest idle first.",
        json_schema_extra=crd(list_map_keys=["name"]),
    )
    autovacuum: Autovacuum = Field(
        default_factory=Autovacuum,
        description="A cap on concurrent autovacuum workers. Deleting the policy resets autovacuum_max_workers "
        "(ALTER SYSTEM RESET) when the value in force is still the one pgwarden wrote.",
        json_schema_extra=crd(fill_defaults=True),
    )

    def observation_gap(self) -> float:
        """Seconds between two observations of a target at most: `interval`, or the shortest positive threshold
        of a session rule (an age, or a blocking rule's minWait) when that is shorter.

        A session can only cross a threshold after it has been in its state that long, so observing once per
        shortest threshold sees every session before it can cross, learns its exact crossing time, and the
        loop wakes exactly then (look-ahead scheduling). Zero thresholds (connectionAge: 0s) match at the next
        observation anyway and do not shorten the gap.
        """
        thresholds = [t for rule in self.sessions for t in rule.ages().values() if t is not None]
        thresholds += [rule.blocking.min_wait for rule in self.sessions if rule.blocking is not None]
        positive = [t.total_seconds() for t in thresholds if t > timedelta(0)]
        return min([self.interval.total_seconds(), *positive])

    @field_validator("interval")
    @classmethod
    def _interval_at_least_a_second(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError(f"must be at least 1s, got {format_duration(value)}")
        return value

    @field_validator("sessions")
    @classmethod
    def _unique_session_rules(cls, value: list[SessionRule]) -> list[SessionRule]:
        _unique_names("session rule", value)
        return value

    @field_validator("connection_limits")
    @classmethod
    def _unique_connection_limits(cls, value: list[ConnectionLimit]) -> list[ConnectionLimit]:
        _unique_names("connection limit", value)
        return value

    @property
    def dry_run(self) -> bool:
        return self.enforcement_action is EnforcementAction.DRY_RUN
