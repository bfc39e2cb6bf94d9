"""manifests/overlays/local stays the shipped manifests with only the image changed.

kustomize cannot take `../../` from inside the base's own folder (a cycle) nor a file outside the
overlay, so the overlay spells out the base's resources and carries a copy of namespace.yaml. This keeps
that copy and the list in step with the base; the real-node tests (tests/cluster) apply the overlay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
OVERLAY = MANIFESTS / "overlays" / "local"


def kustomization(directory: Path) -> dict[str, Any]:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_overlay_has_the_base_resources_and_settings() -> None:
    base, overlay = kustomization(MANIFESTS), kustomization(OVERLAY)
    local_files = {r for r in overlay["resources"] if not r.startswith("../../")}
    assert local_files == {"namespace.yaml"}
    rebased = {f"../../{r}" for r in base["resources"] if r != "namespace.yaml"} | {"namespace.yaml"}
    assert set(overlay["resources"]) == rebased
    for key in set(base) - {"resources"}:
        assert overlay[key] == base[key], key


def test_overlay_namespace_is_the_shipped_one() -> None:
    assert (OVERLAY / "namespace.yaml").read_text() == (MANIFESTS / "namespace.yaml").read_text()


def test_overlay_changes_only_the_image_and_its_pull_policy() -> None:
    overlay = kustomization(OVERLAY)
    assert set(overlay) == set(kustomization(MANIFESTS)) | {"images", "patches"}
    (image,) = overlay["images"]
    assert image == {"name": "localhost/pgwarden", "newName": "localhost/pgwarden", "newTag": "dev"}
    (patch,) = overlay["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "pgwarden"}
    assert yaml.safe_load(patch["patch"]) == [
        {"op": "replace", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"}
    ]
