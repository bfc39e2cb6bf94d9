"""The identity a replica announces in the peering object, computed without a passwd lookup.

kopf's own fallback (`getpass.getuser()`) raises `KeyError: 'getpwuid(): uid not found'` for a uid with
no passwd entry, which is exactly how the image runs (numeric `USER 10001`, no account): every replica
crash-looped at start. So pgwarden names itself: the pod's name when the Deployment passes it (the
downward API sets POD_NAME), otherwise `user@host/started/random` like kopf, with `uid-N` standing in
for a user that has no name.
"""

from __future__ import annotations

import datetime
import getpass
import os
import secrets
import socket


def login_name() -> str:
    """The user's name from the environment or passwd, else `uid-N` (never raises)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no LOGNAME/USER/... and no passwd entry for this uid
        return f"uid-{os.getuid()}"


def peering_identity() -> str:
    """Unique per running process: two replicas (or two local runs) never share one peering record."""
    pod = os.environ.get("POD_NAME") or os.environ.get("POD_ID")
    if pod:
        return pod
    started = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    return f"{login_name()}@{socket.gethostname()}/{started}/{secrets.token_hex(2)}"
