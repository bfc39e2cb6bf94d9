"""Fixtures come as plugins, by cost: PostgreSQL servers, then the Kubernetes control plane."""

pytest_plugins = (
    "tests.fixtures.postgres",
    "tests.fixtures.controlplane",
    "tests.fixtures.operator",
)
