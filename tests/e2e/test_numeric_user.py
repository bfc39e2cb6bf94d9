"""The operator as the image runs it: a numeric uid with no passwd entry, no login name in the environment.

The shipped Deployment crash-looped on a real kubelet: kopf names a replica in the peering object after
`getpass.getuser()`, which raises `KeyError: 'getpwuid(): uid not found: 10001'` for the image's
`USER 10001:10001`. Every other test runs the operator as root with a real account, so none caught it.
Here two replicas run as such a uid, with peering on, one of them named by the Deployment's POD_NAME:
both start, both announce themselves, one pauses, and the other enforces, with no unhandled exception logged.
"""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest
from kubernetes import client

from tests.fixtures.operator import OperatorFactory, OperatorProcess, kopf_peers
from tests.fixtures.postgres import PgFactory
from tests.harness.k8s import create_running_pod
from tests.harness.pgbinaries import e2e_versions
from tests.harness.policies import (
    create_policy,
    create_secret,
    next_host,
    open_app_sessions,
    policy_body,
    prepare_server,
)
from tests.harness.postgres import wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.pg]

IMAGE_UID = 10001
"""The Dockerfile's `USER 10001:10001` and the manifests' runAsUser."""


def uid_without_account() -> int:
    """The image's uid if this machine has no account for it (as in the image), else the next free one."""
    uid = IMAGE_UID
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def process_uid(replica: OperatorProcess) -> int:
    """The real uid of the running operator, from /proc (not from what we asked for)."""
    for line in Path(f"/proc/{replica.proc.pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


# Identity and peering do not depend on the PostgreSQL version: one major.
@pytest.mark.parametrize("pg_major", e2e_versions()[:1], ids=lambda v: f"pg{v}")
def test_replicas_without_a_passwd_entry_start_peer_and_enforce(
    kopf_peering: str,
    k8s_api: client.ApiClient,
    namespace: str,
    pg_factory: PgFactory,
    run_operator: OperatorFactory,
) -> None:
    uid = uid_without_account()
    target = pg_factory(host=next_host(), hba="password")
    prepare_server(target)
    create_secret(k8s_api, namespace)
    create_running_pod(k8s_api, namespace, "db-0", {"app": "pg"}, target.host)

    # As the Deployment runs them: one named by the downward API's POD_NAME, one with no name at all.
    named = run_operator([namespace], run_as=uid, env={"POD_NAME": "pgwarden-7d9f-abcde"}, peering=True)
    anonymous = run_operator([namespace], run_as=uid, peering=True)
    assert [process_uid(r) for r in (named, anonymous)] == [uid, uid]
    for replica in (named, anonymous):
        assert "getpwuid" not in replica.logs()

    def identities() -> set[str]:
        return set(kopf_peers(k8s_api, namespace))

    wait_for(lambda: len(identities()) == 2, timeout=60, message="both replicas' peering records")
    records = identities()
    assert "pgwarden-7d9f-abcde" in records
    (other,) = records - {"pgwarden-7d9f-abcde"}
    assert other.startswith(f"uid-{uid}@"), other

    wait_for(lambda: sum(r.paused() for r in (named, anonymous)) == 1, timeout=60, message="one replica to pause")

    create_policy(k8s_api, namespace, policy_body("reaper", target.port))
    doomed = open_app_sessions(target, 2)
    for pid in doomed:
        target.wait_gone(pid, timeout=30)
    assert named.proc.poll() is None
    assert anonymous.proc.poll() is None
    # Pausing logged no unhandled callback failure (kopf's stream-cancel defect is filtered, see
    # pgwarden.controller.loop_errors): an operator that logs errors while all is well teaches users to ignore them.
    for replica in (named, anonymous):
        assert [line for line in replica.logs().splitlines() if "Exception in callback" in line] == []
