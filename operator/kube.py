"""The operator's one Kubernetes client: synchronous, raw paths over kubernetes' ApiClient.

It speaks raw paths so that one code path covers core, policy and custom resources; `RESOURCES` is
also the list the RBAC test checks the chart against. Every write names the field manager
`grokserve-operator` (children by server-side apply, `/status` and `/scale` by patches), so that
managedFields and apply conflicts name us rather than the client library.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from grokserve.operator import metrics
from grokserve.operator.spec import API_GROUP, API_VERSION, PLURAL


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The object's path, or its collection's (all namespaces when `namespace` is None)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = (
            f"{base}/{self.plural}"
            if namespace is None
            else (f"{base}/namespaces/{namespace}/{self.plural}")
        )
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


RESOURCES: dict[str, Resource] = {
    "ConfigMap": Resource("", "v1", "configmaps"),
    "Service": Resource("", "v1", "services"),
    "PodDisruptionBudget": Resource("policy", "v1", "poddisruptionbudgets"),
    "RayService": Resource("ray.io", "v1", "rayservices"),
    "ServiceMonitor": Resource("monitoring.coreos.com", "v1", "servicemonitors"),
}
GROKDEPLOYMENT = Resource(API_GROUP, API_VERSION, PLURAL)
RAYSERVICE = RESOURCES["RayService"]
SERVICEMONITOR = RESOURCES["ServiceMonitor"]
FIELD_MANAGER = "grokserve-operator"
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
# Guarded status writes retried while other writers keep changing the object.
STATUS_WRITE_ATTEMPTS = 5


def api_message(error: ApiException) -> str:
    """The API server's own explanation (the Status object's message), else the HTTP reason."""
    try:
        return json.loads(error.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {error.status} {error.reason}"


class Kube:
    """Server-side apply, scale, status writes, get and discovery over one ApiClient."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
        verb: str | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if method != "GET":
            query = [("fieldManager", FIELD_MANAGER), *(query or [])]
        request = self.api.param_serialize(
            method,
            path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        verb = verb or (
            "apply" if content_type == "application/apply-patch+yaml" else VERBS[method]
        )
        try:
            response = self.api.call_api(*request, _request_timeout=30)
            response.read()
        except ApiException as error:
            metrics.API_REQUESTS.labels(verb, str(error.status)).inc()
            raise
        except Exception:
            metrics.API_REQUESTS.labels(verb, "0").inc()
            raise
        metrics.API_REQUESTS.labels(verb, str(response.status)).inc()
        # Any 2xx is success: some API servers answer a create with 200 rather than 201.
        return self.api.response_deserialize(response, {"2XX": "object"}).data

    def serves(self, resource: Resource) -> bool:
        """Whether the API server serves this resource (e.g. KubeRay's CRD is installed)."""
        base = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
        try:
            listing = self._call("GET", base)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return any(r.get("name") == resource.plural for r in (listing or {}).get("resources", []))

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", resource.path(namespace, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(
        self, resource: Resource, namespace: str | None, label_selector: str
    ) -> dict[str, Any]:
        """The objects (a List: `items`, `metadata.resourceVersion`) matching the selector."""
        query = [("labelSelector", label_selector)]
        return self._call("GET", resource.path(namespace), query=query, verb="list")

    def watch(
        self,
        resource: Resource,
        namespace: str | None,
        label_selector: str,
        resource_version: str,
        timeout_s: int,
    ) -> WatchStream:
        """The watch events after `resource_version`, until the server ends the stream (at
        `timeout_s`, or when the resource stops being served). An HTTP error raises ApiException."""
        query = [
            ("watch", "true"),
            ("labelSelector", label_selector),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_s)),
        ]
        request = self.api.param_serialize(
            "GET",
            resource.path(namespace),
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*request, _request_timeout=(10, timeout_s + 10))
        except Exception:
            metrics.API_REQUESTS.labels("watch", "0").inc()
            raise
        metrics.API_REQUESTS.labels("watch", str(response.status)).inc()
        if not 200 <= response.status < 300:
            response.read()
            raise ApiException(http_resp=response)
        return WatchStream(response.response)

    def update_status(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        status_for: Callable[[dict[str, Any]], dict[str, Any] | None],
        known: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Write `status_for(stored object)` over the stored status, unless it returns None or
        would leave the status as it is; returns the object as written (None when nothing was).

        status.conditions is one list that several writers share (the reconcile, the autoscaler's
        ScalingActive), so the status is computed from the object as stored and written with a JSON
        patch guarded by its resourceVersion: a write in between fails the guard, and the status is
        computed again from the newer object. Keys set to None are removed from the status.
        `known`, the object as last seen (a watch cache), stands in for the first read: when it is
        stale the guard fails and the next attempt reads the object.
        """
        for attempt in range(STATUS_WRITE_ATTEMPTS):
            stored = known if attempt == 0 and known is not None else None
            stored = stored or self.get(resource, namespace, name)
            if stored is None:
                return None
            changes = status_for(stored)
            if changes is None:
                return None
            merged = {**(stored.get("status") or {}), **changes}
            status = {key: value for key, value in merged.items() if value is not None}
            if status == (stored.get("status") or {}):
                metrics.WRITES_SKIPPED.labels("status").inc()
                return None
            guard = {
                "op": "test",
                "path": "/metadata/resourceVersion",
                "value": stored["metadata"]["resourceVersion"],
            }
            try:
                return self._call(
                    "PATCH",
                    resource.path(namespace, name, "status"),
                    [guard, {"op": "add", "path": "/status", "value": status}],
                    content_type="application/json-patch+json",
                )
            except ApiException as error:
                # 422: the guard failed (someone wrote since the read); 409: the same, as a
                # conflict. Anything else is not ours to retry; after the last try, the caller's.
                if error.status not in (409, 422) or attempt == STATUS_WRITE_ATTEMPTS - 1:
                    raise
        return None

    def foreign_holder(self, body: dict[str, Any], owner_uid: str | None) -> str | None:
        """Who holds this child's name, when it is not a child of ours: "Kind name (reason)".

        Ours means a controller ownerReference to the owner's uid. Anything else (a Service
        someone made by hand, a child of another controller, or of an earlier GrokDeployment of
        the same name that the garbage collector has not deleted yet) is left alone: applying
        over it would take it over, and the garbage collector would delete it with our owner.
        """
        metadata = body["metadata"]
        stored = self.get(RESOURCES[body["kind"]], metadata["namespace"], metadata["name"])
        if stored is None:
            return None
        references = (stored.get("metadata") or {}).get("ownerReferences") or []
        if any(ref.get("controller") and ref.get("uid") == owner_uid for ref in references):
            return None
        controller = next((ref for ref in references if ref.get("controller")), None)
        why = (
            f"controlled by {controller.get('kind')} {controller.get('name')}"
            if controller
            else "not created by this GrokDeployment"
        )
        return f"{body['kind']} {metadata['name']} ({why})"

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: create the object or bring the fields we manage to `body`.

        Fields we applied before and no longer apply are removed (a serviceAccountName or volume
        taken out of the spec goes from the RayService too); fields others manage stay. `force`
        takes back fields someone else changed: the operator is their declared owner. Returns the
        object as stored after the apply.
        """
        metadata = body["metadata"]
        resource = RESOURCES[body["kind"]]
        return self._call(
            "PATCH",
            resource.path(metadata["namespace"], metadata["name"]),
            body,
            content_type="application/apply-patch+yaml",
            query=[("force", "true")],
        )

    def scale(self, resource: Resource, namespace: str, name: str, replicas: int) -> None:
        """Write spec.replicas through /scale, the door `kubectl scale`, an HPA and KEDA use."""
        self._call(
            "PATCH",
            resource.path(namespace, name, "scale"),
            {"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )


class WatchStream:
    """The events of one watch request, one JSON object per line; `close()` from another thread
    ends a read in progress (the operator stopping)."""

    def __init__(self, response: Any) -> None:
        self._response = response

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending = b""
        try:
            # read1: whatever has arrived (up to 64 KiB), not a full 64 KiB, so that each event
            # is handled when it comes.
            while chunk := self._response.read1(64 * 1024):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            self._response.release_conn()

    def close(self) -> None:
        self._response.shutdown()
