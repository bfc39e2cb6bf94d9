"""The few Kubernetes API calls the controller makes itself (kopf does the watching).

The official client is synchronous; calls run in worker threads so one slow request never blocks the
event loop that drives every policy.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from pgwarden.enforcement.targets import PodInfo
from pgwarden.policy import CredentialsSecret
from pgwarden.policy.api import (
    API_VERSION,
    CREDENTIALS_LABEL,
    GROUP,
    KIND,
    PLURAL,
    REPORTS_GROUP,
    REPORTS_PLURAL,
    REPORTS_VERSION,
    VERSION,
)
from pgwarden.policy.api import ConditionReason as Reason

DEFAULT_API_TIMEOUT = 10.0
"""Seconds one API request may take (Settings.api_timeout); the official client otherwise waits forever."""


def load_api_client() -> client.ApiClient:
    """In a pod: its ServiceAccount. Elsewhere: KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    # No silent retries: urllib3's three would make each call's bound four times Settings.api_timeout, and
    # every caller already retries on its own schedule (status writer backoff, next step, Secret fallback).
    configuration.retries = 0
    return client.ApiClient(configuration)


class CredentialsError(Exception):
    """The credentials Secret cannot be used; the message says why and never holds a value."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:
        # Neither value may reach a log line through repr(): the username is whatever the Secret's key holds,
        # and a policy author chooses the key (usernameKey may name the password's).
        return "Credentials(username=***, password=***)"


class SecretReader:
    """Reads Secrets by name (`get` only: no list/watch, so RBAC stays narrow), cached briefly.

    Only Secrets labelled `pgwarden.dev/credentials: "true"` are used: anyone who may edit a policy may
    name any Secret of its namespace, and without the opt-in a policy would send any Secret's values to
    whatever listens at a pod's IP. An unlabelled Secret's data is not even kept.
    The short cache bounds API traffic while a rotated password is picked up within `ttl` seconds.
    """

    def __init__(
        self,
        api: client.ApiClient,
        ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        timeout: float = DEFAULT_API_TIMEOUT,
        stale_max: float = 900.0,
        revalidate_wait: float = 1.0,
    ) -> None:
        """`stale_max`: how long the last good values stay usable while the API server cannot be asked (an API
        stall must not stop enforcement on servers that are fine); `revalidate_wait`: how long a call waits for
        a refresh it started before it settles for those values."""
        self._core = client.CoreV1Api(api)
        self._ttl = ttl
        self._clock = clock
        self._timeout = timeout
        self._stale_max = stale_max
        self._revalidate_wait = revalidate_wait
        self._cache: dict[tuple[str, str], tuple[float, dict[str, str] | CredentialsError]] = {}
        self._refreshing: dict[tuple[str, str], asyncio.Task[dict[str, str]]] = {}
        self._swept = clock()

    def __len__(self) -> int:
        """Entries held (expired ones included until the next sweep)."""
        return len(self._cache)

    def _sweep(self, now: float) -> None:
        """Drop entries too old to be used even as a fallback, at most once per `ttl`: Secrets of deleted
        policies (and their values) would otherwise stay in memory for the life of the process."""
        if now - self._swept < self._ttl:
            return
        self._swept = now
        keep = max(self._ttl, self._stale_max)
        for key in [k for k, (at, _) in self._cache.items() if now - at >= keep]:
            del self._cache[key]

    def invalidate(self, namespace: str, name: str) -> None:
        self._cache.pop((namespace, name), None)

    async def credentials(self, namespace: str, ref: CredentialsSecret) -> Credentials:
        data = await self._secret_data(namespace, ref.name)
        missing = [k for k in (ref.username_key, ref.password_key) if k not in data]
        if missing:
            raise CredentialsError(
                Reason.CREDENTIALS_KEY_MISSING,
                f"Secret {namespace}/{ref.name} has no key {', '.join(repr(k) for k in missing)}",
            )
        return Credentials(data[ref.username_key], data[ref.password_key])

    async def _secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """Fresh values from the cache; else a read. When the read cannot finish now (the API server stalls or
        restarts) and earlier values are at most `stale_max` old, those are used and the read goes on in the
        background: an answer the server does give (not found, unlabelled, forbidden) always wins."""
        key = (namespace, name)
        now = self._clock()
        self._sweep(now)
        cached = self._cache.get(key)
        if cached and now - cached[0] < self._ttl:
            return _unwrap(cached[1])
        fallback: dict[str, str] | None = None
        if cached is not None and not isinstance(cached[1], CredentialsError) and now - cached[0] < self._stale_max:
            fallback = cached[1]
        started = key not in self._refreshing
        task = self._refreshing.get(key) or self._start_refresh(key)
        if fallback is None:
            return await asyncio.shield(task)
        if started:
            await asyncio.wait({task}, timeout=self._revalidate_wait)
        if task.done() and not task.cancelled() and not isinstance(task.exception(), _Unavailable):
            return task.result()  # the server answered: its values, or why they cannot be used (raised)
        return fallback

    def _start_refresh(self, key: tuple[str, str]) -> asyncio.Task[dict[str, str]]:
        task = asyncio.create_task(self._read(*key), name=f"pgwarden secret {key[0]}/{key[1]}")
        self._refreshing[key] = task
        task.add_done_callback(lambda t: self._refreshing.pop(key, None) if self._refreshing.get(key) is t else None)
        # A refresh nobody awaits any more (the caller used the fallback) must not log "never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _read(self, namespace: str, name: str) -> dict[str, str]:
        """One read of the Secret, cached: its values, or the reason it cannot be used (also cached)."""
        key = (namespace, name)
        try:
            secret = await asyncio.to_thread(
                self._core.read_namespaced_secret, name, namespace, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                error = CredentialsError(Reason.CREDENTIALS_SECRET_NOT_FOUND, f"Secret {namespace}/{name} not found")
            elif exc.status == 403:
                error = CredentialsError(Reason.CREDENTIALS_FORBIDDEN, f"not allowed to read Secret {namespace}/{name}")
            else:
                raise _Unavailable(f"reading Secret {namespace}/{name} failed: HTTP {exc.status}") from None
            self._cache[key] = (self._clock(), error)
            raise error from None
        except Exception as exc:  # timeout, connection refused or reset: the server gave no answer
            raise _Unavailable(f"reading Secret {namespace}/{name} failed: {type(exc).__name__}") from None
        try:
            data = _credentials_data(namespace, name, secret)
        except CredentialsError as error:
            self._cache[key] = (self._clock(), error)
            raise
        self._cache[key] = (self._clock(), data)
        return data


class _Unavailable(CredentialsError):
    """The API server gave no usable answer (timeout, 5xx, connection lost): say so, keep nothing."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.CREDENTIALS_UNAVAILABLE, message)


def _unwrap(value: dict[str, str] | CredentialsError) -> dict[str, str]:
    if isinstance(value, CredentialsError):
        raise value
    return value


def _credentials_data(namespace: str, name: str, secret: Any) -> dict[str, str]:
    """The Secret's values as text, if it opted in; the error never quotes a value."""
    labels = (secret.metadata.labels if secret.metadata is not None else None) or {}
    if labels.get(CREDENTIALS_LABEL) != "true":
        raise CredentialsError(
            Reason.CREDENTIALS_SECRET_NOT_LABELLED,
            f'Secret {namespace}/{name} is not labelled {CREDENTIALS_LABEL}: "true"; pgwarden reads only Secrets'
            " that opt in",
        )
    data = {}
    for key, value in (secret.data or {}).items():
        try:
            data[key] = base64.b64decode(value).decode()
        except UnicodeDecodeError:
            # Every key, used or not: a Secret pgwarden reads must be text throughout, and saying so names the
            # key without quoting a byte of it (a partial decode could be most of a password).
            raise CredentialsError(
                Reason.CREDENTIALS_INVALID, f"Secret {namespace}/{name} key {key!r} is not valid UTF-8 text"
            ) from None
    return data


class StatusConflict(Exception):
    """Someone else wrote the policy between our read and our write."""


async def get_custom(
    custom: client.CustomObjectsApi, kind: tuple[str, str, str], namespace: str, name: str, request_timeout: float
) -> dict[str, Any] | None:
    """One namespaced custom object (`kind`: group, version, plural), or None when it does not exist."""
    group, version, plural = kind
    try:
        obj = await asyncio.to_thread(
            custom.get_namespaced_custom_object,
            group,
            version,
            namespace,
            plural,
            name,
            _request_timeout=request_timeout,
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return cast(dict[str, Any], obj)


class StatusRejected(Exception):
    """The API server refused the status itself (413 too large, 422 invalid), not the moment of the write."""


class PolicyApi:
    """Reads and writes PostgresPolicy objects (status only: the spec belongs to the user)."""

    def __init__(self, api: client.ApiClient, timeout: float = DEFAULT_API_TIMEOUT) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._timeout = timeout

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await get_custom(self._custom, (GROUP, VERSION, PLURAL), namespace, name, self._timeout)

    async def write_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> str:
        """Merge-patch `status` only if the object is still at `resource_version`; return the new version.

        Lists in a merge patch replace the stored list, which is why the caller sends the whole list
        it computed from the version it read, and why the precondition is needed.
        """
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        try:
            obj = await asyncio.to_thread(
                self._custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == 409:
                raise StatusConflict(f"{namespace}/{name} changed since resourceVersion {resource_version}") from None
            if exc.status in (413, 422):
                raise StatusRejected(
                    f"{namespace}/{name}: status refused with HTTP {exc.status}: {exc.reason}"
                ) from None
            raise
        return str(cast(dict[str, Any], obj)["metadata"]["resourceVersion"])


class ReportApi:
    """Reads, writes and deletes openreports `Report` objects (pgwarden's own: one per policy, same name)."""

    def __init__(self, api: client.ApiClient, timeout: float = DEFAULT_API_TIMEOUT) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._timeout = timeout

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await get_custom(
            self._custom, (REPORTS_GROUP, REPORTS_VERSION, REPORTS_PLURAL), namespace, name, self._timeout
        )

    async def put(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create the Report, or merge-patch an existing one with the whole content (pgwarden is its only
        writer: the active replica of one policy's loop; lists in a merge patch replace the stored ones)."""
        name = str(body["metadata"]["name"])
        try:
            obj = await asyncio.to_thread(
                self._custom.patch_namespaced_custom_object,
                REPORTS_GROUP,
                REPORTS_VERSION,
                namespace,
                REPORTS_PLURAL,
                name,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            obj = await asyncio.to_thread(
                self._custom.create_namespaced_custom_object,
                REPORTS_GROUP,
                REPORTS_VERSION,
                namespace,
                REPORTS_PLURAL,
                body,
                _request_timeout=self._timeout,
            )
        return cast(dict[str, Any], obj)

    async def delete(self, namespace: str, name: str, uid: str) -> bool:
        """Delete the Report if it is still the object `uid` (the one pgwarden wrote, not one created under
        the same name since); False if there was none (or another object holds the name: 409)."""
        try:
            await asyncio.to_thread(
                self._custom.delete_namespaced_custom_object,
                REPORTS_GROUP,
                REPORTS_VERSION,
                namespace,
                REPORTS_PLURAL,
                name,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)),
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True


def reports_served(api: client.ApiClient, timeout: float = DEFAULT_API_TIMEOUT) -> bool:
    """Whether the API server serves openreports `reports` (its CRDs installed), by discovery: readable by
    every authenticated identity, so no RBAC on CRDs is needed. Any answer but "not found" is raised.

    Synchronous on purpose: it runs once before kopf starts, and its answer decides what the loops do."""
    try:
        resources = client.CustomObjectsApi(api).get_api_resources(
            REPORTS_GROUP, REPORTS_VERSION, _request_timeout=timeout
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return any(r.name == REPORTS_PLURAL for r in (resources.resources or []))


class PodApi:
    """Reads one pod by name: the sidecar's own labels and annotations, the controller's check of an address."""

    def __init__(self, api: client.ApiClient, timeout: float = DEFAULT_API_TIMEOUT) -> None:
        self._core = client.CoreV1Api(api)
        self._timeout = timeout

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            pod = await asyncio.to_thread(
                self._core.read_namespaced_pod, name, namespace, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self._core.api_client.sanitize_for_serialization(pod))


class PodMoved(Exception):
    """The pod the index named is gone, leaving, or has another address now: its old IP may be someone else's."""


class PodAddressCheck:
    """The controller's `PodCheck`: one read of the pod before the first action on a new connection.

    The pods index is kopf's watch cache; when the watch stalls it keeps a deleted pod, and the pod's IP may
    already belong to another pod (another team's PostgreSQL). Reading the pod itself costs one request per
    new connection, not per cycle; when it cannot be read, nothing is done on that connection.
    """

    def __init__(self, pods: PodApi) -> None:
        self._pods = pods

    async def __call__(self, pod: PodInfo) -> None:
        try:
            live = await self._pods.get(pod.namespace, pod.name)
        except Exception as exc:
            status = exc.status if isinstance(exc, ApiException) else type(exc).__name__
            raise PodMoved(f"pod {pod.name} could not be read to confirm its address ({status})") from None
        if live is None:
            raise PodMoved(f"pod {pod.name} no longer exists; its address {pod.pod_ip} is not used")
        meta, status = live.get("metadata") or {}, live.get("status") or {}
        if meta.get("deletionTimestamp"):
            raise PodMoved(f"pod {pod.name} is being deleted")
        if status.get("podIP") != pod.pod_ip:
            raise PodMoved(f"pod {pod.name} now has address {status.get('podIP')}, not {pod.pod_ip}")


class PolicyLister:
    """Lists the policies of one namespace (the sidecar's view; the controller uses kopf's watch)."""

    def __init__(self, api: client.ApiClient, timeout: float = DEFAULT_API_TIMEOUT) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._timeout = timeout

    async def list(self, namespace: str) -> list[dict[str, Any]]:
        result = await asyncio.to_thread(
            self._custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            _request_timeout=self._timeout,
        )
        return [dict(item) for item in cast(dict[str, Any], result).get("items", [])]


class EventPoster:
    """Posts core/v1 Events about a policy without kopf (the sidecar runs no kopf)."""

    def __init__(
        self, api: client.ApiClient, component: str, instance: str, timeout: float = DEFAULT_API_TIMEOUT
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._timeout = timeout
        self._component = component
        self._instance = instance

    async def post(self, policy: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = policy.get("metadata") or {}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "metadata": {"generateName": "pgwarden-", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self._component, "host": self._instance},
            "reportingComponent": self._component,
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await asyncio.to_thread(
                self._core.create_namespaced_event,
                str(meta.get("namespace")),
                body,  # type: ignore[arg-type]
                _request_timeout=self._timeout,
            )
        except Exception as exc:  # an Event is best effort (refused, timed out); the action is already logged
            status = exc.status if isinstance(exc, ApiException) else type(exc).__name__
            structlog.get_logger("pgwarden.sidecar").warning("event not posted", reason=reason, status=status)


PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
CLUSTER_PEERINGS = "clusterkopfpeerings"
NAMESPACED_PEERINGS = "kopfpeerings"
PEERING_FIX = (
    "install the peering CRDs (kubectl apply -k manifests/peering/) and let the operator create the object, "
    "or pass --standalone to run a single replica without peering"
)


class PeeringUnavailable(Exception):
    """The peering object the replicas must share is missing and cannot be created; the message says how to fix it.

    Without it every replica would enforce on its own (kopf falls back to standalone, or pauses forever when
    peering is mandatory), so `pgwarden run` refuses to start instead.
    """


def ensure_peering(api: client.ApiClient, name: str, namespaces: Sequence[str] | None) -> list[str]:
    """Make sure kopf's peering object `name` exists before kopf starts: cluster-wide (`namespaces` None) the
    ClusterKopfPeering, else a KopfPeering in each watched namespace. Creates what is missing when allowed;
    returns one outcome per object ("created" or "exists"); raises PeeringUnavailable otherwise.

    Synchronous on purpose: it runs before the event loop and kopf, and its answer decides whether they start.
    """
    custom = client.CustomObjectsApi(api)
    if namespaces is None:
        return [_ensure_one(custom, name, None)]
    return [_ensure_one(custom, name, namespace) for namespace in namespaces]


def _ensure_one(custom: client.CustomObjectsApi, name: str, namespace: str | None) -> str:
    plural = CLUSTER_PEERINGS if namespace is None else NAMESPACED_PEERINGS
    crd = f"{plural}.{PEERING_GROUP}"
    kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
    where = "" if namespace is None else f" in namespace {namespace}"
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": kind, "metadata": metadata}
    try:
        if namespace is None:
            custom.create_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, plural, body, _request_timeout=DEFAULT_API_TIMEOUT
            )
        else:
            custom.create_namespaced_custom_object(
                PEERING_GROUP, PEERING_VERSION, namespace, plural, body, _request_timeout=DEFAULT_API_TIMEOUT
            )
    except ApiException as exc:
        if exc.status == 409:
            return "exists"
        if exc.status == 404:
            missing = f"the CRD {crd} is not installed" + (
                f" (or namespace {namespace} does not exist)" if namespace else ""
            )
            raise PeeringUnavailable(f"{kind} {name!r}{where}: {missing}; {PEERING_FIX}") from None
        if exc.status == 403:
            return _existing_or_refuse(custom, name, namespace, f"{kind} {name!r}{where} ({crd})")
        raise
    return "created"


def _peering_objects(custom: client.CustomObjectsApi, name: str, namespace: str | None) -> list[dict[str, Any]]:
    """kopf's peering objects named `name`: the ClusterKopfPeering (`namespace` None) or the namespace's
    KopfPeering (a list with a field selector: `list` is the verb kopf's watch needs anyway)."""
    selector = f"metadata.name={name}"
    if namespace is None:
        found = custom.list_cluster_custom_object(
            PEERING_GROUP,
            PEERING_VERSION,
            CLUSTER_PEERINGS,
            field_selector=selector,
            _request_timeout=DEFAULT_API_TIMEOUT,
        )
    else:
        found = custom.list_namespaced_custom_object(
            PEERING_GROUP,
            PEERING_VERSION,
            namespace,
            NAMESPACED_PEERINGS,
            field_selector=selector,
            _request_timeout=DEFAULT_API_TIMEOUT,
        )
    return list(cast(dict[str, Any], found).get("items") or [])


def _existing_or_refuse(custom: client.CustomObjectsApi, name: str, namespace: str | None, what: str) -> str:
    """Creation was forbidden: fine if the object is already there."""
    try:
        found = _peering_objects(custom, name, namespace)
    except ApiException as exc:
        if exc.status in (403, 404):
            raise PeeringUnavailable(
                f"{what}: this identity may neither create nor list it; grant list, watch and patch on it "
                f"(and create, or create the object yourself), or pass --standalone for a single replica"
            ) from None
        raise
    if found:
        return "exists"
    raise PeeringUnavailable(
        f"{what} does not exist and this identity may not create it; create it (kind {what.split()[0]}, "
        f"name {name!r}), grant create, or pass --standalone for a single replica"
    )


def peering_record_present(api: client.ApiClient, name: str, namespace: str | None, identity: str) -> bool:
    """Whether kopf's peering object `name` (cluster-wide when `namespace` is None) holds `identity`'s record."""
    items = _peering_objects(client.CustomObjectsApi(api), name, namespace)
    return any(identity in (item.get("status") or {}) for item in items)
