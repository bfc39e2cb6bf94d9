"""The Kubernetes side of pgwarden: kopf handlers, targets, Secrets, status, Events and metrics.

Knows nothing about SQL: everything that touches PostgreSQL goes through `pgwarden.engine`.
"""
