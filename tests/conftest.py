"""Fixtures come as plugins, by cost: PostgreSQL servers, then the Kubernetes control plane."""

from __future__ import annotations

import pytest

pytest_plugins = (
    "tests.fixtures.postgres",
    "tests.fixtures.controlplane",
    "tests.fixtures.operator",
)


def _tier(item: pytest.Item) -> int:
    """0: needs nothing built from Go (unit, PostgreSQL); 1: the control plane; 2: helm or prometheus too;
    3: the real node (its Go builds and images come last in the background chain)."""
    if item.get_closest_marker("cluster") is not None:
        return 3
    if item.get_closest_marker("prometheus") is not None or "helm" in item.nodeid:
        return 2
    return 1 if item.get_closest_marker("k8s") is not None else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests that need no Go-built tool first (a stable sort: the order within a tier stays).

    `make test` builds the control plane, helm, prometheus, the node's components and the images in the
    background on a cold machine (see the Makefile's pytest target); the unit and PostgreSQL tiers run
    meanwhile, and the first test that needs a tool still being built waits for that build (hack/*-build.sh
    take a lock) instead of starting another.
    """
    items.sort(key=_tier)
