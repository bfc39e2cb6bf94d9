"""The enforcement loop the controller and the sidecar share: which pods, when, status, Events, metrics.

It drives the engine (through `pgwarden.engine.session`) and talks to the Kubernetes API with the plain
client (status writes, Secrets, Events), never through kopf: the kopf controller (`pgwarden.controller`)
and the sidecar (`pgwarden.sidecar`) are two thin users of it, each deciding only where targets and
credentials come from.
"""
