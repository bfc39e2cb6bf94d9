"""The real openreports CRDs (a pinned copy, see tests/data/openreports/SOURCE.md) and ways to read Reports.

`ReportHistory` watches a namespace's Reports in a thread and keeps every version the API server stored, so a
test can assert on a verdict that lasted one cycle (a reaped session is `fail` until the next quiet cycle)
without racing it by polling.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

from kubernetes import client, watch

from pgwarden.policy.api import REPORTS_GROUP, REPORTS_PLURAL, REPORTS_VERSION
from tests.fixtures.operator import apply_crd_file, delete_crds

OPENREPORTS = Path(__file__).resolve().parents[1] / "data" / "openreports"
CRD_FILES = (OPENREPORTS / "openreports.io_reports.yaml", OPENREPORTS / "openreports.io_clusterreports.yaml")
CRD_NAMES = ["reports.openreports.io", "clusterreports.openreports.io"]


def install_openreports(api: client.ApiClient) -> list[str]:
    """Create (or replace) the pinned CRDs and wait until they are Established."""
    return [name for path in CRD_FILES for name in apply_crd_file(api, path)]


def remove_openreports(api: client.ApiClient) -> None:
    """Delete the CRDs (their objects with them) and wait until they are gone."""
    delete_crds(api, CRD_NAMES)


def reports_served(api: client.ApiClient) -> bool:
    try:
        client.CustomObjectsApi(api).get_api_resources(REPORTS_GROUP, REPORTS_VERSION)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def get_report(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            REPORTS_GROUP, REPORTS_VERSION, namespace, REPORTS_PLURAL, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(cast(dict[str, Any], obj))


def results_by(report: dict[str, Any]) -> dict[tuple[str | None, str | None], dict[str, Any]]:
    """Results by (pod, rule); a result without resources (the policy itself) has pod None."""
    out: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for result in report.get("results") or []:
        resources = result.get("resources") or [{}]
        out[(resources[0].get("name"), result.get("rule"))] = result
    return out


class ReportHistory:
    """Every version of the namespace's Reports as the API server stored them (ADDED and MODIFIED events)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._namespace = namespace
        self._lock = threading.Lock()
        self._versions: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reports {namespace}", daemon=True)
        self._thread.start()

    def versions(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [v for v in self._versions if v["metadata"]["name"] == name]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        resource_version = "0"  # from the start: any state, then every change after it
        while not self._stop.is_set():
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            for event in stream.stream(  # type: ignore[no-untyped-call]
                self._custom.list_namespaced_custom_object,
                REPORTS_GROUP,
                REPORTS_VERSION,
                self._namespace,
                REPORTS_PLURAL,
                resource_version=resource_version,
                timeout_seconds=2,  # short, so that stop() is prompt
            ):
                obj = cast(dict[str, Any], event["object"])
                resource_version = obj["metadata"]["resourceVersion"]
                if event["type"] in ("ADDED", "MODIFIED"):
                    with self._lock:
                        self._versions.append(obj)
                if self._stop.is_set():
                    stream.stop()  # type: ignore[no-untyped-call]
