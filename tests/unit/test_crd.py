"""The PostgresPolicy CRD is generated from the model, and the corpus holds the model to the CRD's messages.

The model (pgwarden.policy.model) is the CRD's one source: `make crd` writes
manifests/crd/pgwarden.dev_postgrespolicies.yaml with pgwarden.policy.crd. What is checked here, with no
API server:

- the committed file is what the model generates now (the diff is printed when it is not);
- the generated schema is one the API server takes, and what its defaulting fills in is what the model
  assumes;
- every document of tests/data/policies/ is accepted or refused by the model as the corpus says, with
  the message users read, and the corpus covers every constraint of the schema.
  tests/e2e/test_crd.py sends the same documents to a real kube-apiserver.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from datetime import timedelta
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pgwarden.policy import crd as generator
from pgwarden.policy.model import PolicySpec
from pgwarden.policy.openapi import CRD_REQUIRED
from tests.harness.policy_corpus import (
    CRD_DIR,
    CRD_PATH,
    INVALID,
    MODEL_ACCEPTS,
    MODEL_REFUSES,
    VALID,
    Example,
    apply_crd_defaults,
    drop_empty,
    load_crd,
    model_refusal,
    version_schema,
)


def _schema_nodes(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every schema node under `node` with its path (`spec.sessions[].name`, `...backends{}`)."""
    out = [(path, node)]
    for key, child in node.get("properties", {}).items():
        out += _schema_nodes(child, f"{path}.{key}" if path else key)
    if isinstance(node.get("additionalProperties"), dict):
        out += _schema_nodes(node["additionalProperties"], f"{path}{{}}")
    if "items" in node:
        out += _schema_nodes(node["items"], f"{path}[]")
    return out


def _spec_schema() -> dict[str, Any]:
    schema = version_schema(load_crd())["properties"]["spec"]
    assert isinstance(schema, dict)
    return schema


# --- the committed file is the generated one ------------------------------------------------------------


def test_committed_crd_is_generated_from_the_model() -> None:
    committed, generated = CRD_PATH.read_text(encoding="utf-8"), generator.render()
    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True),
            generated.splitlines(keepends=True),
            fromfile=f"{CRD_PATH.relative_to(CRD_DIR.parents[1])} (committed)",
            tofile="generated from operator/pgwarden/policy/",
        )
        pytest.fail("the committed CRD is stale; run `make crd` and commit the result:\n" + "".join(diff))


def test_generated_text_reads_back_as_the_document() -> None:
    """The YAML rendering (folded long lines, flow-style short lists) changes no value: CEL rules included."""
    assert yaml.safe_load(generator.render()) == generator.custom_resource_definition()


def test_kustomization_lists_the_crd_alone() -> None:
    """A GitOps user can point at manifests/crd/ and get exactly the API."""
    kustomization = yaml.safe_load((CRD_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [CRD_PATH.name]
    assert sorted(p.name for p in CRD_DIR.glob("*.yaml")) == sorted(["kustomization.yaml", CRD_PATH.name])


# --- the generator ----------------------------------------------------------------------------------------


def test_the_model_and_the_crd_differ_only_in_selector() -> None:
    """The one deliberate difference: the CLI ignores selector, so the model lets it be absent; the CRD
    requires it, so that no policy targets every database by omission."""
    model_schema = json.dumps(PolicySpec.model_json_schema())
    assert model_schema.count(f'"{CRD_REQUIRED}"') == 1
    assert PolicySpec.model_json_schema()["properties"]["selector"][CRD_REQUIRED] is True
    assert _spec_schema()["required"] == ["selector"]
    assert CRD_REQUIRED not in generator.render()


class _Union(BaseModel):
    port: int | str


class _Inner(BaseModel):
    """An object of its own."""

    name: str


class _NestedOptional(BaseModel):
    at: timedelta = timedelta(minutes=1, seconds=30)
    inner: _Inner | None = None


def test_the_generator_refuses_what_a_structural_schema_cannot_say() -> None:
    raw = _Union.model_json_schema()
    with pytest.raises(generator.CrdSchemaError, match=r"spec\.port: only `X \| None` unions"):
        generator._structural(raw, raw.get("$defs", {}), "spec")


def test_the_generator_inlines_optional_objects_and_writes_go_durations() -> None:
    raw = _NestedOptional.model_json_schema(schema_generator=generator._CrdJsonSchema)
    schema = generator._structural({"properties": raw["properties"]}, raw["$defs"], "spec")
    assert schema["properties"]["at"] == {"type": "string", "default": "1m30s"}
    assert schema["properties"]["inner"] == {
        "type": "object",
        "description": "An object of its own.",
        "required": ["name"],
        "properties": {"name": {"type": "string"}},
    }


def test_every_field_has_a_description() -> None:
    """Users read these in `kubectl explain pgpolicy.spec...`; each says what the field does to PostgreSQL.

    Every property and every object in a list needs one; the strings inside a list of strings are
    described by the list.
    """
    missing = [
        path
        for path, node in _schema_nodes(version_schema(load_crd()), "")
        if path not in ("", "metadata")
        and (not path.endswith(("[]", "{}")) or node.get("type") == "object")
        and not node.get("description", "").strip()
    ]
    assert missing == []


def test_schema_is_structural() -> None:
    """The rules of a structural schema the API server would otherwise reject the CRD for, checked early."""
    schema = version_schema(load_crd())
    assert schema["properties"]["metadata"] == {"type": "object"}
    for path, node in _schema_nodes(schema, ""):
        assert "type" in node, f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: both kinds of fields"
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), f"{path}: list-map keys must be required"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{path}: CEL rule {rule['rule']!r} has no message for users"


def test_printer_columns_show_schema_fields() -> None:
    """The columns' JSONPaths are written by hand: each must still name a field of the schema."""
    (version,) = load_crd()["spec"]["versions"]
    paths = {path for path, _ in _schema_nodes(version_schema(load_crd()), "")}
    for column in version["additionalPrinterColumns"]:
        field = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"].lstrip("."))
        assert field.startswith("metadata.") or field in paths, f"column {column['name']} shows no schema field"


def test_crd_defaults_are_the_model_defaults() -> None:
    """What the API server fills in is what the model assumes: every defaultable field at once."""
    minimal: dict[str, Any] = {
        "selector": {},
        "connection": {"credentialsSecret": {"name": "pgwarden"}},
        "sessions": [{"name": "idle", "action": "terminate", "stateAge": "10m"}],
        "connectionLimits": [{"name": "per-user", "groupBy": "user", "max": 20}],
    }
    server_view = apply_crd_defaults(copy.deepcopy(minimal), _spec_schema())
    model_view = PolicySpec.model_validate(minimal).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert drop_empty(server_view) == drop_empty(model_view)


def test_crd_defaulting_matches_the_server_for_a_known_case() -> None:
    """Pins apply_crd_defaults to what kube-apiserver 1.37 returned for `spec: {selector: {}}`."""
    assert apply_crd_defaults({"selector": {}}, _spec_schema()) == {
        "selector": {},
        "connection": {"port": 5432, "database": "postgres", "sslMode": "prefer", "requireAuth": "scram-sha-256"},
        "interval": "30s",
        "enforcementAction": "enforce",
        "limits": {"maxActionsPerCycle": 50, "maxFractionPerCycle": 0.5},
        "autovacuum": {"cancelExcessWorkers": False},
    }


# --- the corpus ---------------------------------------------------------------------------------------


def test_corpus_is_well_formed() -> None:
    """Valid files carry no expectations; every invalid one starts with `# expect:`; names are unique."""
    assert VALID
    assert INVALID
    for example in VALID:
        assert (example.expect, example.expect_model) == (None, None), example.name
    for example in INVALID:
        assert example.text.startswith("# expect: "), example.name
        assert example.expect_code in (400, 422), example.name
        assert example.document()["metadata"]["name"] == example.path.stem, example.name
    for example in VALID:
        assert example.document()["metadata"]["name"], example.name
    names = [e.document()["metadata"]["name"] for e in VALID]
    assert len(names) == len(set(names))
    listed = set(MODEL_ACCEPTS) | set(MODEL_REFUSES)
    assert listed <= {e.name for e in VALID + INVALID}, "a listed difference names no corpus file"
    assert set(MODEL_REFUSES) <= {e.name for e in VALID}
    assert set(MODEL_ACCEPTS) <= {e.name for e in INVALID}


def _constraints(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, marker) for every constraint of the spec schema: an invalid example must show each one."""
    out: list[tuple[str, str]] = [("spec", "Required value")]
    for path, node in _schema_nodes(spec, "spec"):
        for name in node.get("required", []):
            out.append((f"{path}.{name}", "Required value"))
        if "enum" in node:
            out.append((path, "Unsupported value"))
        if "minimum" in node:
            relation = "greater than" if node.get("exclusiveMinimum") else "greater than or equal to"
            out.append((path, f"should be {relation} {node['minimum']}"))
        if "maximum" in node:
            out.append((path, f"should be less than or equal to {node['maximum']}"))
        if "minLength" in node:
            out.append((path, f"should be at least {node['minLength']} chars long"))
        if "maxLength" in node:
            out.append((path, f"Too long: may not be more than {node['maxLength']} bytes"))
        if "maxItems" in node:
            out.append((path, f"must have at most {node['maxItems']} items"))
        if node.get("x-kubernetes-list-type") == "map":
            out.append((f"{path}[]", "Duplicate value"))
        for rule in node.get("x-kubernetes-validations", []):
            for message in _message_texts(rule):
                out.append((path, message))
    return out


def _message_texts(rule: dict[str, Any]) -> list[str]:
    """The start of each message a CEL rule can give: its `message`, or the texts its messageExpression joins."""
    expression = rule.get("messageExpression")
    if not expression:
        return [rule["message"].strip()[:40]]
    literals = [m.group(2) for m in re.finditer(r"(['\"])(.*?)\1", expression)]
    texts = [s.lstrip("' ") for s in literals if not s.startswith("^")]  # `^...`: a regex, not a message
    return [s[:40] for s in texts if len(s) >= 12]


def test_corpus_covers_every_constraint() -> None:
    """Every required field, enum, bound, list-map key and CEL message of the spec has an invalid example."""
    expectations = [re.sub(r"\[\d+\]", "[]", e.expect or "") for e in INVALID]
    uncovered = [
        f"{path}: {marker}"
        for path, marker in _constraints(_spec_schema())
        if not any((f"{path}: " in e or f"{path} in body" in e) and marker in e for e in expectations)
    ]
    assert uncovered == []


@pytest.mark.parametrize("example", VALID, ids=lambda e: e.name)
def test_valid_example_is_accepted_by_the_model(example: Example) -> None:
    refusal = model_refusal(example)
    if example.name in MODEL_REFUSES:
        assert refusal is not None, f"the model now accepts {example.name}: delete it from MODEL_REFUSES"
        return
    assert refusal is None


@pytest.mark.parametrize("example", VALID, ids=lambda e: e.name)
def test_crd_defaulting_keeps_the_meaning(example: Example) -> None:
    """The model reads the spec the API server stores (defaults applied) as it reads the file."""
    if example.name in MODEL_REFUSES:
        pytest.skip(MODEL_REFUSES[example.name])
    spec = example.document()["spec"]
    stored = apply_crd_defaults(copy.deepcopy(spec), _spec_schema())
    assert PolicySpec.model_validate(stored) == PolicySpec.model_validate(spec)


@pytest.mark.parametrize("example", INVALID, ids=lambda e: e.name)
def test_invalid_example_is_refused_by_the_model(example: Example) -> None:
    """Refused with the message users read: `# expect-model:` when the model words it apart, else `# expect:`."""
    refusal = model_refusal(example)
    if example.name in MODEL_ACCEPTS:
        assert refusal is None, f"the model now refuses {example.name}: delete it from MODEL_ACCEPTS"
        return
    assert refusal is not None, "the model accepts what the CRD refuses"
    expected = example.expect_model or example.expect
    assert expected is not None
    assert expected in refusal
