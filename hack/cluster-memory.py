"""Memory of every running container on the `make cluster` node, read from its cgroup (v1) on the host.

There is no metrics-server (so no `kubectl top`); the kubelet's own figure, the working set, is the cgroup's
usage less its inactive file cache, which is what this prints, with the resident anonymous memory (rss) and
the container's memory request and limit beside it. Run as root on the node's host:

    .venv/bin/python hack/cluster-memory.py [-n NAMESPACE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import cluster  # the checkout's harness, found from this file (path set above)

MEMORY = Path("/sys/fs/cgroup/memory/kubepods")
MIB = 1024 * 1024


def cgroup_of(pod_uid: str, container_id: str) -> Path | None:
    """kubepods/<qos>/pod<uid>/<id> (guaranteed pods sit directly under kubepods)."""
    for candidate in MEMORY.glob(f"**/pod{pod_uid}/{container_id}"):
        return candidate
    return None


def stat(directory: Path) -> dict[str, int]:
    lines = (directory / "memory.stat").read_text().splitlines()
    return {key: int(value) for key, value in (line.split() for line in lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", help="only this namespace (default: all)")
    args = parser.parse_args(argv)
    scope = ["-n", args.namespace] if args.namespace else ["--all-namespaces"]
    pods = json.loads(cluster.kubectl("get", "pods", *scope, "-o", "json").stdout)["items"]
    print(f"{'namespace/pod':52} {'container':12} {'working set':>12} {'rss':>8} {'request':>8} {'limit':>8}")
    for pod in pods:
        specs = {c["name"]: c.get("resources", {}) for c in pod["spec"]["containers"]}
        for status in pod["status"].get("containerStatuses", []):
            if "running" not in status["state"] or "containerID" not in status:
                continue
            directory = cgroup_of(pod["metadata"]["uid"], status["containerID"].split("://", 1)[1])
            if directory is None:
                continue
            usage = int((directory / "memory.usage_in_bytes").read_text())
            counters = stat(directory)
            working = usage - counters.get("total_inactive_file", 0)
            resources = specs.get(status["name"], {})
            request = resources.get("requests", {}).get("memory", "-")
            limit = resources.get("limits", {}).get("memory", "-")
            print(
                f"{pod['metadata']['namespace'] + '/' + pod['metadata']['name']:52} {status['name']:12}"
                f" {working / MIB:9.1f} MiB {counters.get('total_rss', 0) / MIB:8.1f}"
                f" {request:>8} {limit:>8}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
