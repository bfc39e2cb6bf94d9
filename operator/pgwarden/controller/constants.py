"""Names shared by the controller and sidecar: the API coordinates and the labels/annotations we read."""

from typing import Final

GROUP: Final = "pgwarden.dev"
VERSION: Final = "v1alpha1"
PLURAL: Final = "postgrespolicies"
KIND: Final = "PostgresPolicy"
FINALIZER: Final = "pgwarden.dev/finalizer"
ENFORCER_ANNOTATION: Final = "pgwarden.dev/enforcer"
SIDECAR: Final = "sidecar"
CONTROLLER: Final = "controller"
PEERING_NAME: Final = "pgwarden"
