"""Test harness: real PostgreSQL servers and a real Kubernetes control plane, started from the project's files."""
