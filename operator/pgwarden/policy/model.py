"""Typed models of `PostgresPolicy.spec` (pgwarden.dev/v1alpha1).

Field names are the CRD's camelCase; Python code uses snake_case attributes. Unknown fields are
errors, so a typo in a policy is refused instead of silently meaning "no rule". Defaults here are the
CRD's defaults (tests/unit/test_crd_schema.py and tests/e2e/test_crd.py keep the two in step).
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

from pgwarden.policy.durations import format_duration, parse_duration

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PREFIX_LENGTH = re.compile(r"0|[1-9][0-9]{0,2}")

Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]
"""A Go-style duration string in YAML, a timedelta in Python."""


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
        raise ValueError(f"{value!r} is not a CIDR such as '10.0.0.0/8' or an address such as '10.0.0.7'") from None
    return value


def _check_dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.fullmatch(value):  # fullmatch: `$` would let a trailing newline in
        raise ValueError(
            f"{value!r} must be a DNS label: at most 63 lowercase letters, digits or '-', starting and ending "
            "with a letter or digit"
        )
    return value


def _no_strings_or_booleans(value: object) -> object:
    """The API server takes only JSON numbers for integer fields (5432, or 5432.0), never "5432" or true."""
    if isinstance(value, str | bool):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}")
    return value


Cidr = Annotated[str, AfterValidator(_check_cidr)]
Integer = Annotated[int, BeforeValidator(_no_strings_or_booleans)]
RuleName = Annotated[str, AfterValidator(_check_dns_label)]
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
    """Values of `pg_stat_activity.state`."""

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


class LabelSelectorRequirement(_Model):
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Model):
    """A Kubernetes label selector; only the operator uses it (the CLI ignores it)."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)

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
    name: str = Field(min_length=1)
    username_key: str = Field(default="username", min_length=1)
    password_key: str = Field(default="password", min_length=1)


class ConnectionSettings(_Model):
    """How the operator reaches each target pod; the CLI and sidecar take a DSN instead."""

    port: Integer = Field(default=5432, ge=1, le=65535)
    database: str = Field(default="postgres", min_length=1)
    ssl_mode: SslMode = SslMode.PREFER
    credentials_secret: CredentialsSecret | None = None


class Limits(_Model):
    """Blast-radius guard: caps on how much one cycle may do to one target."""

    max_actions_per_cycle: Integer = Field(default=50, ge=1)
    max_fraction_per_cycle: float = Field(default=0.5, gt=0, le=1, strict=True)  # strict: ints yes, "0.5" no


class SessionFilters(_Model):
    """Which sessions a rule is about; empty lists mean any. Globs are fnmatch-style, case-sensitive."""

    users: list[Pattern] = Field(default_factory=list)
    databases: list[Pattern] = Field(default_factory=list)
    application_names: list[Pattern] = Field(default_factory=list)
    client_addresses: list[Cidr] = Field(default_factory=list, max_length=32)


class Exclude(_Model):
    """Sessions no rule may touch, on top of the built-in protections."""

    users: list[Pattern] = Field(default_factory=list)
    databases: list[Pattern] = Field(default_factory=list)
    application_names: list[Pattern] = Field(default_factory=list)


class SessionRule(SessionFilters):
    name: RuleName
    action: SessionAction
    states: list[SessionState] = Field(default_factory=list)
    state_age: Duration | None = None
    query_age: Duration | None = None
    transaction_age: Duration | None = None
    connection_age: Duration | None = None

    @model_validator(mode="after")
    def _needs_an_age(self) -> SessionRule:
        if all(age is None for age in self.ages().values()):
            raise ValueError("a session rule needs at least one of stateAge, queryAge, transactionAge, connectionAge")
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
    name: RuleName
    group_by: GroupBy
    max: Integer = Field(ge=0)
    include_active: bool = Field(default=False, strict=True)


class Autovacuum(_Model):
    max_workers: Annotated[int, Field(ge=1, le=262143), BeforeValidator(_no_strings_or_booleans)] | None = None
    cancel_excess_workers: bool = Field(default=False, strict=True)


def _unique_names(kind: str, items: list[SessionRule] | list[ConnectionLimit]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{kind} names must be unique; {item.name!r} appears more than once")
        seen.add(item.name)


class PolicySpec(_Model):
    selector: LabelSelector | None = None
    connection: ConnectionSettings = Field(default_factory=ConnectionSettings)
    interval: Duration = Field(default=timedelta(seconds=30))
    enforcement_action: EnforcementAction = EnforcementAction.ENFORCE
    limits: Limits = Field(default_factory=Limits)
    exclude: Exclude = Field(default_factory=Exclude)
    sessions: list[SessionRule] = Field(default_factory=list, max_length=64)
    connection_limits: list[ConnectionLimit] = Field(default_factory=list, max_length=64)
    autovacuum: Autovacuum = Field(default_factory=Autovacuum)

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
