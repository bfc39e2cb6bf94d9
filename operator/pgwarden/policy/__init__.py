"""The PostgresPolicy spec as typed Python: parsing, defaults and validation, with no I/O.

Both the engine and the controller take these models; neither re-validates what this layer accepted.
"""

from pgwarden.policy.document import PolicyDocument, PolicyError, load_policy_document, parse_spec
from pgwarden.policy.durations import format_duration, parse_duration
from pgwarden.policy.model import (
    Autovacuum,
    ConnectionLimit,
    ConnectionSettings,
    CredentialsSecret,
    EnforcementAction,
    Exclude,
    LabelSelector,
    Limits,
    PolicySpec,
    RequireAuth,
    SessionRule,
)

__all__ = [
    "Autovacuum",
    "ConnectionLimit",
    "ConnectionSettings",
    "CredentialsSecret",
    "EnforcementAction",
    "Exclude",
    "LabelSelector",
    "Limits",
    "PolicyDocument",
    "PolicyError",
    "PolicySpec",
    "RequireAuth",
    "SessionRule",
    "format_duration",
    "load_policy_document",
    "parse_duration",
    "parse_spec",
]
