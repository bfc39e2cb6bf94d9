"""The policy corpus (tests/data/policies/) and the committed CRD, for the tests that use both.

Every file under `valid/` must be admitted by the model and by a real API server with the CRD; every
file under `invalid/` must be refused by both, with the message its `# expect:` line quotes (and
`# expect-model:` when the model words it differently). tests/unit/test_crd.py holds the model to that,
tests/e2e/test_crd.py and tests/e2e/test_manifests.py the API server and kubectl.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pgwarden.policy import PolicyError, load_policy_document
from pgwarden.policy.crd import FILE_NAME

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "manifests" / "crd"
CRD_PATH = CRD_DIR / FILE_NAME
CORPUS = REPO / "tests" / "data" / "policies"

# Refused by the CRD, accepted by the model. Each entry says why; tests/unit/test_crd.py asserts the
# model really accepts these, so the list cannot go stale: when the model changes, delete the entry.
MODEL_ACCEPTS: dict[str, str] = {
    "missing-selector.yaml": "deliberate: the CLI ignores selector, so the model keeps it optional",
}

# Admitted by the API server, refused by the model (the server prunes nulls, then defaults).
MODEL_REFUSES: dict[str, str] = {}

_HEADER = re.compile(r"^# (expect|expect-model|expect-code): (.*)$")


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
        match = _HEADER.match(line)
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


def model_refusal(example: Example) -> str | None:
    """The model's error message for the example, or None when it accepts it."""
    try:
        load_policy_document(example.text)
    except PolicyError as error:
        return str(error)
    return None


def load_crd() -> dict[str, Any]:
    """The committed CRD document, as `kubectl apply` sends it."""
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
