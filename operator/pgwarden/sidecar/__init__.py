"""`pgwarden sidecar`: the enforcement loop inside a PostgreSQL pod, on its own server; no kopf, no Secrets."""
