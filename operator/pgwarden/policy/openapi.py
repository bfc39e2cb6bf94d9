"""The CRD's schema words that pydantic has none for, written on the model beside the field they constrain.

`pgwarden.policy.crd` builds the PostgresPolicy CRD from `PolicySpec.model_json_schema()`. Most of the
schema comes from the model as it is (types, enums, bounds pydantic enforces, defaults, descriptions);
what only the API server checks is added here, as `json_schema_extra`:

- CEL rules (`x-kubernetes-validations`), each with the message users read when it fails. The model
  checks the same thing in a Python validator; the corpus under tests/data/policies/ proves they agree.
- `maxLength`/`maxItems` bounds that exist so the API server can bound the cost of those rules. They go
  into the schema only, so the model's own messages stay what they are.
- list-map keys (`x-kubernetes-list-type: map`), a `default: {}` that lets an absent object's fields be
  defaulted, and a field the CRD requires while the model does not.

`crd(...)` returns a plain JSON dict, so it works wherever pydantic takes `json_schema_extra`: on a
`Field`, on an `Annotated` type, or in a model's `model_config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

JsonValue: TypeAlias = "int | float | str | bool | list[JsonValue] | JsonDict | None"
JsonDict: TypeAlias = "dict[str, JsonValue]"
"""A JSON object, as pydantic's `json_schema_extra` takes it (pydantic spells it so, without exporting it)."""

CRD_REQUIRED: str = "x-pgwarden-crd-required"
"""Marks a property the CRD requires and the model does not; the generator moves it into `required`."""


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry: a CEL rule and what the user reads when it is broken.

    `message` is required even with `message_expression`: the API server falls back to it when the
    expression cannot be evaluated, and a reader of the CRD sees what the rule is about.
    """

    rule: str
    message: str
    message_expression: str | None = None

    def as_json(self) -> JsonDict:
        out: JsonDict = {"rule": self.rule}
        if self.message_expression is not None:
            out["messageExpression"] = self.message_expression
        out["message"] = self.message
        return out


def crd(
    *,
    rules: Sequence[CelRule] = (),
    max_length: int | None = None,
    max_items: int | None = None,
    list_map_keys: Sequence[str] = (),
    fill_defaults: bool = False,
    required: bool = False,
) -> JsonDict:
    """Schema keywords only the CRD carries, for pydantic's `json_schema_extra`.

    rules: CEL rules on this value (a field, a list item, or an object given in `model_config`).
    max_length, max_items: bounds the API server needs to estimate the cost of CEL rules; the model
        does not check them (its validators refuse such values with their own, clearer messages).
    list_map_keys: this list is a map keyed by these item fields: unique, merged per item by
        server-side apply.
    fill_defaults: an absent object is stored as `{}`, so the defaults of its fields apply.
    required: the CRD requires this field although the model does not (a deliberate difference).
    """
    extra: JsonDict = {}
    if max_length is not None:
        extra["maxLength"] = max_length
    if max_items is not None:
        extra["maxItems"] = max_items
    if fill_defaults:
        extra["default"] = {}
    if list_map_keys:
        extra["x-kubernetes-list-type"] = "map"
        keys: list[JsonValue] = list(list_map_keys)
        extra["x-kubernetes-list-map-keys"] = keys
    if rules:
        extra["x-kubernetes-validations"] = [rule.as_json() for rule in rules]
    if required:
        extra[CRD_REQUIRED] = True
    return extra


# -- schema nodes written by hand (the status, the document around the spec) -------------------------


def string(
    description: str,
    *,
    enum: Sequence[str] = (),
    format: str | None = None,
    pattern: str | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
) -> JsonDict:
    node: JsonDict = {"type": "string"}
    if format is not None:
        node["format"] = format
    node["description"] = description
    if enum:
        values: list[JsonValue] = list(enum)
        node["enum"] = values
    if min_length is not None:
        node["minLength"] = min_length
    if max_length is not None:
        node["maxLength"] = max_length
    if pattern is not None:
        node["pattern"] = pattern
    return node


def integer(description: str | None, *, format: str, minimum: int | None = None) -> JsonDict:
    """An integer of `format` int32 or int64 (which Kubernetes clients map to their integer types)."""
    node: JsonDict = {"type": "integer", "format": format}
    if description is not None:
        node["description"] = description
    if minimum is not None:
        node["minimum"] = minimum
    return node


def boolean(description: str) -> JsonDict:
    return {"type": "boolean", "description": description}


def obj(
    description: str,
    properties: dict[str, JsonDict] | None = None,
    *,
    required: Sequence[str] = (),
    values: JsonDict | None = None,
    preserve_unknown_fields: bool = False,
) -> JsonDict:
    """An object with `properties`, or a map whose values are `values`, or (preserve_unknown_fields) anything."""
    node: JsonDict = {"type": "object", "description": description}
    if required:
        names: list[JsonValue] = list(required)
        node["required"] = names
    if preserve_unknown_fields:
        node["x-kubernetes-preserve-unknown-fields"] = True
    if properties is not None:
        fields: JsonDict = dict(properties)
        node["properties"] = fields
    if values is not None:
        node["additionalProperties"] = values
    return node


def array(
    description: str, items: JsonDict, *, max_items: int | None = None, list_map_keys: Sequence[str] = ()
) -> JsonDict:
    node: JsonDict = {"type": "array", "description": description}
    node.update(crd(max_items=max_items, list_map_keys=list_map_keys))
    node["items"] = items
    return node
