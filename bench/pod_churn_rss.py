"""Benchmark: the operator's memory while 5,000 real Pods come and go (issue 12: no leaks).

Starts its own control plane (etcd + kube-apiserver, tests.harness) and `pgwarden run` with one policy.
Then, twice: 5,000 Pod objects are created in the policy's namespace (Running, with a podIP, labelled so
the policy does NOT select them: only kopf's pods index and the policy loop's look at it hold them), and
deleted again. VmRSS of the operator is printed after start, at the peak of each wave and after each
deletion (once the operator has seen every deletion: its log is quiet and a fixed settle time passed).
Target: RSS after the second deletion within 10 MB of after the first (nothing kept per pod ever seen).

    .venv/bin/python bench/pod_churn_rss.py [--pods 5000] [--threads 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO)]

from kubernetes import client  # noqa: E402

from tests.fixtures.operator import OperatorProcess, apply_crds  # noqa: E402
from tests.harness.controlplane import ControlPlane  # noqa: E402
from tests.harness.k8s import create_running_pod, new_namespace  # noqa: E402
from tests.harness.policies import create_policy, create_secret, policy_body  # noqa: E402
from tests.harness.postgres import wait_for  # noqa: E402

SETTLE_SECONDS = 20.0


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def create_pods(api: client.ApiClient, namespace: str, count: int, threads: int, wave: int) -> float:
    started = time.monotonic()

    def one(i: int) -> None:
        ip = f"127.{100 + wave}.{i // 250}.{i % 250 + 1}"
        create_running_pod(api, namespace, f"churn-{wave}-{i}", {"app": "other", "wave": str(wave)}, ip)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    return time.monotonic() - started


def delete_pods(api: client.ApiClient, namespace: str, wave: int) -> float:
    started = time.monotonic()
    core = client.CoreV1Api(api)
    core.delete_collection_namespaced_pod(namespace, label_selector=f"wave={wave}", grace_period_seconds=0)
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector=f"wave={wave}", limit=1).items,
        timeout=600,
        interval=1.0,
        message="every pod deleted",
    )
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="pgwarden-churn-") as tmp,
        ControlPlane() as plane,
        plane.api_client() as api,
    ):
        apply_crds(api)
        namespace = new_namespace(api, "churn")
        create_secret(api, namespace)
        operator = OperatorProcess(plane.kubeconfig, [namespace], Path(tmp), ["--standalone"])
        try:
            wait_for(operator.healthy, timeout=60, message="operator healthz")
            create_policy(api, namespace, policy_body("churn", 5432))
            time.sleep(SETTLE_SECONDS)  # a benchmark's settle time, not synchronisation: nothing to wait for
            rows = [("after start, 1 policy, 0 pods", *rss_mb(operator.proc.pid))]
            for wave in (1, 2):
                took = create_pods(api, namespace, args.pods, args.threads, wave)
                time.sleep(SETTLE_SECONDS)
                rows.append((f"wave {wave}: {args.pods} pods created in {took:.0f} s", *rss_mb(operator.proc.pid)))
                took = delete_pods(api, namespace, wave)
                time.sleep(SETTLE_SECONDS)
                rows.append((f"wave {wave}: deleted in {took:.0f} s", *rss_mb(operator.proc.pid)))
            if operator.proc.poll() is not None:
                raise RuntimeError(f"operator exited: {operator.logs()[-3000:]}")
        finally:
            operator.stop()
    print(f"{'phase':<46} {'RSS MB':>8} {'peak MB':>8}")
    for phase, rss, peak in rows:
        print(f"{phase:<46} {rss:>8.1f} {peak:>8.1f}")
    growth = rows[-1][1] - rows[2][1]
    print(f"growth from the first deletion to the second: {growth:+.1f} MB (target within 10 MB)")
    return 0 if abs(growth) <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
