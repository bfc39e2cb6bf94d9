"""End-to-end plugins: the operator process fixtures on top of the control plane and PostgreSQL."""

pytest_plugins = ("tests.fixtures.operator",)
