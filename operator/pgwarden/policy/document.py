"""Reading a whole `PostgresPolicy` document (the YAML a user applies) and explaining what is wrong.

Errors name the field the way a Kubernetes user would write it (`spec.sessions[0].stateAge`), because
the same message goes to a CLI user's terminal and to a policy's status condition.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pgwarden.policy.api import API_VERSION, KIND
from pgwarden.policy.model import PolicySpec


class PolicyError(ValueError):
    """A policy that cannot be used; the message names each offending field."""


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    namespace: str | None = None


class PolicyDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: Metadata
    spec: PolicySpec
    status: dict[str, Any] | None = None


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "function-after", "function-before")):
            continue
        else:
            out += f".{part}" if out else part
    return out


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: `field.path: what is wrong`."""
    lines = []
    for err in exc.errors(include_url=False):
        where = _location(tuple(err["loc"]))
        if prefix:
            where = f"{prefix}.{where}" if where else prefix
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)


def parse_spec(spec: Any) -> PolicySpec:
    """Validate a spec mapping (from the API server or a file); raise PolicyError naming the fields."""
    if not isinstance(spec, dict):
        raise PolicyError("spec: must be a mapping")
    try:
        return PolicySpec.model_validate(spec)
    except ValidationError as exc:
        raise PolicyError(describe_validation_error(exc, "spec")) from None


def load_policy_document(text: str) -> PolicyDocument:
    """Parse one PostgresPolicy YAML/JSON document; raise PolicyError with every problem found."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PolicyError("the policy file must hold one PostgresPolicy object")
    if raw.get("apiVersion") != API_VERSION:
        raise PolicyError(f"apiVersion: must be {API_VERSION!r}, got {raw.get('apiVersion')!r}")
    if raw.get("kind") != KIND:
        raise PolicyError(f"kind: must be {KIND!r}, got {raw.get('kind')!r}")
    try:
        return PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(describe_validation_error(exc)) from None
