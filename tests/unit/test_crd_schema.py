"""The PostgresPolicy CRD and the pydantic model say the same thing, checked without an API server.

The issue forbids drift between `manifests/crd/pgwarden.dev_postgrespolicies.yaml` and
`pgwarden.policy.model`. Neither is generated from the other (the CRD carries CEL rules and
PostgreSQL-facing descriptions a generator would lose), so agreement is proven instead:

- structurally: both are walked side by side (field names, required fields, types, enums, bounds,
  defaults), with every CRD-only constraint listed below and explained;
- by defaulting: the API server's structural defaulting, re-implemented here, gives the model's defaults;
- by example: the corpus under `tests/data/policies/` (the same files tests/e2e/test_crd.py sends to a
  real kube-apiserver) is accepted or refused by the model as the CRD does, and covers every constraint.

Helpers here (`Example`, `load_examples`, `apply_crd_defaults`, ...) are imported by the e2e test.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from pgwarden.policy import PolicyError, load_policy_document, parse_duration
from pgwarden.policy.model import PolicySpec

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "manifests" / "crd"
CRD_PATH = CRD_DIR / "pgwarden.dev_postgrespolicies.yaml"
CORPUS = REPO / "tests" / "data" / "policies"
GROUP, VERSION, PLURAL, KIND = "pgwarden.dev", "v1alpha1", "postgrespolicies", "PostgresPolicy"

# Refused by the CRD, accepted by the model. Each entry says why; the test below asserts the model
# really accepts these, so the list cannot go stale: when the model changes, delete the entry. The
# `# expect-model:` lines of the pending files already quote what the changed model will say.
MODEL_ACCEPTS: dict[str, str] = {
    "missing-selector.yaml": "deliberate: the CLI ignores selector, so the model keeps it optional",
}

# Admitted by the API server, refused by the model (the server prunes nulls, then defaults).
MODEL_REFUSES: dict[str, str] = {}

# Constraints the CRD has and the model's JSON schema does not, by schema path. maxLength/maxItems bound
# the cost of CEL rules (the API server refuses a CRD whose rules it cannot bound); the model checks
# DNS-label lengths in a validator instead of a schema keyword.
CRD_ONLY_BOUNDS: dict[str, dict[str, int]] = {
    "spec.interval": {"maxLength": 64},
    "spec.sessions[].name": {"maxLength": 63},
    "spec.sessions[].stateAge": {"maxLength": 64},
    "spec.sessions[].queryAge": {"maxLength": 64},
    "spec.sessions[].transactionAge": {"maxLength": 64},
    "spec.sessions[].connectionAge": {"maxLength": 64},
    "spec.sessions[].clientAddresses[]": {"maxLength": 64},
    "spec.connectionLimits[].name": {"maxLength": 63},
    "spec.connectionLimits[].clientAddresses[]": {"maxLength": 64},
}
# Required by the CRD only (see MODEL_ACCEPTS).
CRD_ONLY_REQUIRED = {("spec", "selector")}

HEADER = re.compile(r"^# (expect|expect-model|expect-code): (.*)$")


@dataclass(frozen=True)
class Example:
    """One corpus document and what the API server and the model must say about it."""

    path: Path
    text: str
    expect: str | None  # substring of the API server's refusal; None for a valid example
    expect_model: str | None  # substring of the model's refusal, when it differs from `expect`
    expect_code: int  # HTTP status of the refusal: 422 (Invalid), 400 for strict field validation

    @property
    def name(self) -> str:
        return self.path.name

    def document(self) -> dict[str, Any]:
        """A fresh copy of the YAML document (callers may change it)."""
        doc = yaml.safe_load(self.text)
        assert isinstance(doc, dict), f"{self.path}: not one mapping"
        return doc


def _read_example(path: Path) -> Example:
    headers: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = HEADER.match(line)
        if match:
            assert match.group(1) not in headers, f"{path.name}: {match.group(1)} given twice"
            headers[match.group(1)] = match.group(2)
    return Example(
        path=path,
        text=path.read_text(),
        expect=headers.get("expect"),
        expect_model=headers.get("expect-model"),
        expect_code=int(headers.get("expect-code", "422")),
    )


def load_examples(kind: str) -> list[Example]:
    """Every example under tests/data/policies/<kind>/ (kind: valid or invalid), by file name."""
    return [_read_example(path) for path in sorted((CORPUS / kind).glob("*.yaml"))]


VALID = load_examples("valid")
INVALID = load_examples("invalid")


def load_crd() -> dict[str, Any]:
    """The CRD document as the API server receives it."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(crd, dict)
    return crd


def version_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The openAPIV3Schema of the only version."""
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def apply_crd_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """kube-apiserver's structural defaulting, in place (apiextensions-apiserver `structuraldefaulting`).

    Nulls of non-nullable fields are pruned; an absent field with a `default` gets a copy of it; then
    the walk descends, into just-defaulted values too (that is how `default: {}` on an object fills in
    the defaults of its fields). tests/e2e/test_crd.py checks this against the real server.
    """
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties is not None:
            for key in [k for k, v in value.items() if v is None and not properties.get(k, {}).get("nullable")]:
                del value[key]
            for key, prop in properties.items():
                if key not in value and "default" in prop:
                    value[key] = copy.deepcopy(prop["default"])
            for key, item in value.items():
                if key in properties:
                    apply_crd_defaults(item, properties[key])
        elif isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                apply_crd_defaults(item, schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_crd_defaults(item, schema["items"])
    return value


def drop_empty(value: Any) -> Any:
    """`value` without empty lists and mappings, recursively: to the model an absent list is an empty one."""
    if isinstance(value, dict):
        out = {k: drop_empty(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [drop_empty(v) for v in value]
    return value


def model_refusal(example: Example) -> str | None:
    """The model's error message for the example, or None when it accepts it."""
    try:
        load_policy_document(example.text)
    except PolicyError as error:
        return str(error)
    return None


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


# --- the CRD file itself ------------------------------------------------------------------------------


def test_crd_names_scope_and_version() -> None:
    crd = load_crd()
    assert (crd["apiVersion"], crd["kind"]) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == (GROUP, "Namespaced")
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (KIND, PLURAL, "postgrespolicy")
    assert names["shortNames"] == ["pgpolicy"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert version["subresources"] == {"status": {}}


def test_kustomization_lists_the_crd_alone() -> None:
    """A GitOps user can point at manifests/crd/ and get exactly the API."""
    kustomization = yaml.safe_load((CRD_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [CRD_PATH.name]
    assert sorted(p.name for p in CRD_DIR.glob("*.yaml")) == sorted(["kustomization.yaml", CRD_PATH.name])


def test_printer_columns() -> None:
    (version,) = load_crd()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    default_view = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert default_view == ["Mode", "Targets", "Ready", "Actions", "Age"]
    assert columns["Mode"]["jsonPath"] == ".spec.enforcementAction"
    assert columns["Targets"]["jsonPath"] == ".status.targetCount"
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Actions"]["jsonPath"] == ".status.totals.actions"
    assert (columns["Age"]["jsonPath"], columns["Age"]["type"]) == (".metadata.creationTimestamp", "date")
    schema = version_schema(load_crd())
    paths = {path for path, _ in _schema_nodes(schema, "")}
    for column in columns.values():
        field = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"].lstrip("."))
        assert field.startswith("metadata.") or field in paths, f"column {column['name']} shows no schema field"


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


def test_status_schema() -> None:
    """The status the controller and sidecars write: list-maps so that writers merge, not overwrite."""
    status = version_schema(load_crd())["properties"]["status"]
    fields = status["properties"]
    assert set(fields) == {
        "observedGeneration",
        "conditions",
        "targetCount",
        "readyTargets",
        "targets",
        "totals",
        "kopf",
    }
    conditions = fields["conditions"]
    assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == ("map", ["type"])
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert conditions["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"
    targets = fields["targets"]
    assert (targets["x-kubernetes-list-type"], targets["x-kubernetes-list-map-keys"]) == ("map", ["pod"])
    target = targets["items"]["properties"]
    assert target["enforcer"]["enum"] == ["controller", "sidecar"]
    assert target["backends"]["additionalProperties"] == {"type": "integer", "format": "int64"}
    assert target["autovacuum"]["x-kubernetes-preserve-unknown-fields"] is True
    assert target["lastActions"]["maxItems"] > 0
    assert set(target["lastActions"]["items"]["properties"]) == {
        "rule",
        "action",
        "pid",
        "user",
        "database",
        "applicationName",
        "clientAddress",
        "state",
        "done",
    }
    assert set(fields["totals"]["properties"]) == {"actions", "terminated", "cancelled", "autovacuumCancelled"}
    assert fields["kopf"]["x-kubernetes-preserve-unknown-fields"] is True


# --- the CRD and the model, side by side --------------------------------------------------------------


def _model_node(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON-schema node with `$ref` resolved and `X | None` unwrapped to X."""
    node = dict(node)
    if "anyOf" in node:
        (real,) = [n for n in node.pop("anyOf") if n.get("type") != "null"]
        node = {**real, **node}
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    return node


def _same_default(crd: Any, model: Any, node: dict[str, Any]) -> bool:
    if node.get("format") == "duration":  # the model's JSON schema writes ISO 8601 (PT30S)
        as_timedelta: timedelta = TypeAdapter(timedelta).validate_python(model)
        return parse_duration(crd) == as_timedelta
    return bool(crd == model and type(crd) is type(model))


def _compare(crd: dict[str, Any], model: dict[str, Any], defs: dict[str, Any], path: str, out: list[str]) -> None:
    """Append to `out` every way the CRD node and the model node disagree."""
    model = _model_node(model, defs)
    if crd.get("type") != model.get("type"):
        out.append(f"{path}: type {crd.get('type')} in the CRD, {model.get('type')} in the model")
        return
    if crd.get("enum") != model.get("enum"):
        out.append(f"{path}: enum {crd.get('enum')} in the CRD, {model.get('enum')} in the model")
    crd_bounds: dict[str, Any] = {
        k: crd[k] for k in ("minimum", "maximum", "minLength", "maxLength", "maxItems") if k in crd
    }
    if crd.get("exclusiveMinimum"):
        crd_bounds["exclusiveMinimum"] = crd_bounds.pop("minimum")
    model_bounds: dict[str, Any] = {
        k: model[k]
        for k in ("minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "maxItems")
        if k in model
    }
    expected_extra: dict[str, int] = CRD_ONLY_BOUNDS.get(path, {})
    if crd_bounds != {**model_bounds, **expected_extra}:
        out.append(f"{path}: bounds {crd_bounds} in the CRD, {model_bounds} (+ {expected_extra}) in the model")
    if "default" in crd or model.get("default") is not None:
        if crd.get("default") == {} and crd.get("type") == "object":
            pass  # `default: {}` only lets the defaults of the object's fields apply; compared below
        elif "default" not in crd or not _same_default(crd["default"], model.get("default"), model):
            out.append(f"{path}: default {crd.get('default')!r} in the CRD, {model.get('default')!r} in the model")
    if crd.get("type") == "object":
        crd_fields, model_fields = set(crd.get("properties", {})), set(model.get("properties", {}))
        if crd_fields != model_fields:
            out.append(
                f"{path}: only in the CRD {crd_fields - model_fields}, only in the model {model_fields - crd_fields}"
            )
        crd_required = set(crd.get("required", []))
        model_required = set(model.get("required", [])) | {f for p, f in CRD_ONLY_REQUIRED if p == path}
        if crd_required != model_required:
            out.append(f"{path}: required {sorted(crd_required)} in the CRD, {sorted(model_required)} in the model")
        for name in sorted(crd_fields & model_fields):
            _compare(crd["properties"][name], model["properties"][name], defs, f"{path}.{name}", out)
        crd_map, model_map = crd.get("additionalProperties"), model.get("additionalProperties")
        if isinstance(crd_map, dict) or isinstance(model_map, dict):
            if not (isinstance(crd_map, dict) and isinstance(model_map, dict)):
                out.append(f"{path}: a map in one, not in the other")
            else:
                _compare(crd_map, model_map, defs, f"{path}{{}}", out)
    if crd.get("type") == "array":
        _compare(crd["items"], model["items"], defs, f"{path}[]", out)


def test_spec_schema_agrees_with_the_model() -> None:
    """Same fields, required fields, types, enums, bounds and defaults; CRD-only bounds as listed."""
    model_schema = PolicySpec.model_json_schema(by_alias=True)
    crd_spec = version_schema(load_crd())["properties"]["spec"]
    problems: list[str] = []
    _compare(crd_spec, model_schema, model_schema.get("$defs", {}), "spec", problems)
    assert problems == []


def test_crd_defaults_are_the_model_defaults() -> None:
    """What the API server fills in is what the model assumes: every defaultable field at once."""
    minimal: dict[str, Any] = {
        "selector": {},
        "connection": {"credentialsSecret": {"name": "pgwarden"}},
        "sessions": [{"name": "idle", "action": "terminate", "stateAge": "10m"}],
        "connectionLimits": [{"name": "per-user", "groupBy": "user", "max": 20}],
    }
    schema = version_schema(load_crd())["properties"]["spec"]
    server_view = apply_crd_defaults(copy.deepcopy(minimal), schema)
    model_view = PolicySpec.model_validate(minimal).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert drop_empty(server_view) == drop_empty(model_view)


def test_crd_defaulting_matches_the_server_for_a_known_case() -> None:
    """Pins apply_crd_defaults to what kube-apiserver 1.37 returned for `spec: {selector: {}}`."""
    schema = version_schema(load_crd())["properties"]["spec"]
    assert apply_crd_defaults({"selector": {}}, schema) == {
        "selector": {},
        "connection": {"port": 5432, "database": "postgres", "sslMode": "prefer"},
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
    spec = version_schema(load_crd())["properties"]["spec"]
    expectations = [re.sub(r"\[\d+\]", "[]", e.expect or "") for e in INVALID]
    uncovered = [
        f"{path}: {marker}"
        for path, marker in _constraints(spec)
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
    schema = version_schema(load_crd())["properties"]["spec"]
    assert PolicySpec.model_validate(apply_crd_defaults(copy.deepcopy(spec), schema)) == PolicySpec.model_validate(spec)


@pytest.mark.parametrize("example", INVALID, ids=lambda e: e.name)
def test_invalid_example_is_refused_by_the_model(example: Example) -> None:
    refusal = model_refusal(example)
    if example.name in MODEL_ACCEPTS:
        assert refusal is None, f"the model now refuses {example.name}: delete it from MODEL_ACCEPTS"
        return
    assert refusal is not None, "the model accepts what the CRD refuses"
    expected = example.expect_model or example.expect
    assert expected is not None
    assert expected in refusal
