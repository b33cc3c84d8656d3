"""KMock 0.8's KubernetesEmulator, completed into an API server that kopf and kubectl can drive.

KMock 0.8 keeps objects and serves discovery, but as an API server for kopf it lacks: uid,
resourceVersion and generation (kopf's JSON-patches `test` resourceVersion); 201 on create; 422 for
a failed JSON-patch `test`; a `status` subresource separate from the object; `/api/v1/namespaces`;
`labelSelector`; JSON-typed watch streams (kubectl refuses octet-stream); CRD registration; the
garbage collector (ownerReferences); server-side apply with managedFields (`managed_fields.py`); and
the defaults of a CRD's schema, applied to its objects on every write.
`KubeApi` serves every namespaced object request itself (on KMock's object store and watch buses)
and leaves discovery to KMock.

`KubeApiThread` runs it on its own event loop in a thread, so that tests, kopf (KopfRunner runs in
another thread) and kubectl (a subprocess) can block freely without starving the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import rendering

from testkit import managed_fields
from testkit.crd_cel import apply_defaults

CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
CORE_RESOURCES: dict[str, dict[str, Any]] = {
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap", "shortnames": {"cm"}},
    "v1/services": {"kind": "Service", "singular": "service", "shortnames": {"svc"}},
    "v1/events": {"kind": "Event", "singular": "event", "shortnames": {"ev"}},
    "policy/v1/poddisruptionbudgets": {
        "kind": "PodDisruptionBudget",
        "singular": "poddisruptionbudget",
        "shortnames": {"pdb"},
    },
    "events.k8s.io/v1/events": {"kind": "Event", "singular": "event"},
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
# Put on a resource's watch bus when its CRD is deleted: the server ends those watches.
RESOURCE_GONE = {"type": "GONE"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }
    return aiohttp.web.json_response(body, status=code)


def _selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class KubeApi(kmock.KubernetesEmulator):
    """The emulator with the API-server semantics kopf and kubectl rely on (see the module doc)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._revision = 0
        # Admission webhooks (or RBAC), in effect: hook(method, resource, subresource, body) ->
        # (code, message) refuses the request.
        self.admission: list[Callable[[str, Any, str | None, Any], tuple[int, str] | None]] = []
        self._printer_columns: dict[Any, list[dict[str, Any]]] = {}
        # openAPIV3Schema of each CRD-served resource: its defaults are applied on every write.
        self._schemas: dict[Any, dict[str, Any]] = {}
        # Every event with its revision, so that a watch from resourceVersion N replays what
        # happened after N (as the API server does) instead of re-sending everything as ADDED.
        self._events: list[tuple[int, Any, dict[str, Any]]] = []
        # How long a watch runs when the client does not say: short, so that tests see kopf
        # reconnect; kube-apiserver's own is 30 to 60 minutes (--min-request-timeout 1800).
        self.watch_timeout_s = 60.0
        for key, info in CORE_RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(namespaced=True, verbs=VERBS, **info)
        # Cluster-scoped, served by `__call__`; kopf waits for it in discovery before it watches.
        self.resources["v1/namespaces"] = kmock.ResourceInfo(
            namespaced=False, kind="Namespace", singular="namespace", shortnames={"ns"}, verbs=VERBS
        )
        self.resources[CRD_RESOURCE] = kmock.ResourceInfo(
            namespaced=False,
            kind="CustomResourceDefinition",
            singular="customresourcedefinition",
            shortnames={"crd"},
            verbs=VERBS,
        )

    # -- entry points ------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # KMock's path parser crashes on the cluster-scoped /api/v1/namespaces.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            if raw_request.method != "GET":
                return _status(405, "MethodNotAllowed", "namespaces exist implicitly here")
            if "watch" in raw_request.query:
                return await self._watch_namespaces(raw_request)
            return aiohttp.web.json_response(self._namespace_list())
        return await super().__call__(raw_request)

    async def _watch_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> Any:
        """The namespaces that exist now, then silence until the watch times out (namespaces
        exist implicitly here, so none come or go while watching)."""
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        if raw_request.query.get("resourceVersion", "0") == "0":
            for item in self._namespace_list()["items"]:
                event = {"type": "ADDED", "object": item}
                await response.write(json.dumps(event).encode() + b"\n")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(
                float(raw_request.query.get("timeoutSeconds") or self.watch_timeout_s)
            )
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _serve_version(self, request: rendering.Request) -> Any:
        listing = await super()._serve_version(request)
        # Core resources are "v1", not "/v1"; subresources carry no short names (kubectl would
        # warn that `gd` is ambiguous between grokdeployments and grokdeployments/status).
        listing["groupVersion"] = listing["groupVersion"].lstrip("/")
        for entry in listing["resources"]:
            if "/" in entry["name"]:
                entry["shortNames"], entry["categories"] = [], []
        return listing

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if resource is None or resource.plural is None:
            return await super()._handle(request)  # discovery, version, non-k8s paths
        # The declared resources (core, CRDs) only: KMock's own list also walks every object.
        if resource not in set(super(kmock.KubernetesEmulator, self)._get_resources()):
            return _status(404, "NotFound", f"the server could not find the resource {resource}")
        method = request.method.value.upper()
        for hook in self.admission:
            verdict = hook(method, request.resource, request.subresource, request.data)
            if verdict is not None:
                reasons = {422: "Invalid", 413: "RequestEntityTooLarge", 503: "ServiceUnavailable"}
                return _status(verdict[0], reasons.get(verdict[0], "Forbidden"), verdict[1])
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return await self._watch(request)
        if method == "GET":
            return await self._read(request)
        if method == "POST":
            return await self._create(request)
        if method == "PATCH" and request.name and managed_fields.is_apply(request.headers):
            return await self._server_side_apply(request)
        if method in ("PATCH", "PUT") and request.name:
            return await self._modify(request, replace=method == "PUT")
        if method == "DELETE" and request.name:
            return await self._delete(request)
        return _status(405, "MethodNotAllowed", f"{method} {request.url.path} is not supported")

    # -- helpers -----------------------------------------------------------------------------

    def _info(self, resource: Any) -> kmock.ResourceInfo:
        return self.resources[resource]

    def _has_status(self, resource: Any) -> bool:
        return "status" in self._info(resource).subresources

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _namespace_list(self) -> dict[str, Any]:
        names = sorted({ns for _, ns, _ in self.objects if ns} | {"default"})
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
        return {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items}

    def _stored(self, resource: Any, namespace: str | None, name: str) -> Any:
        # By key: every object is stored under (resource, namespace, name) by the verbs below.
        return self.objects._objects.get((resource, namespace, name))

    def _live(self, resource: Any, namespace: str | None, name: str) -> Any:
        obj = self._stored(resource, namespace, name)
        return None if obj is None or obj.deleted else obj

    def _matching(self, request: rendering.Request) -> list[dict[str, Any]]:
        selector = request.params.get("labelSelector")
        found = []
        for (resource, namespace, _), obj in self.objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            raw = obj.raw
            if _selector_matches(selector, (raw.get("metadata") or {}).get("labels") or {}):
                found.append(raw)
        return found

    async def _publish(self, resource: Any, event_type: str, raw: dict[str, Any]) -> None:
        event = {"type": event_type, "object": copy.deepcopy(raw)}
        if event_type == "DELETED":
            event["object"]["metadata"]["resourceVersion"] = self._next_revision()
        self._events.append((int(event["object"]["metadata"]["resourceVersion"]), resource, event))
        await self._buses[resource].put(event)

    def _scale(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {k: raw["metadata"].get(k) for k in ("name", "namespace", "uid")},
            "spec": {"replicas": (raw.get("spec") or {}).get("replicas", 0)},
            "status": {
                "replicas": (raw.get("status") or {}).get("replicas", 0),
                "selector": (raw.get("status") or {}).get("selector", ""),
            },
        }

    # -- verbs -------------------------------------------------------------------------------

    async def _read(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        async with self._lock:
            if request.name is None:
                info = self._info(request.resource)
                if "as=Table" in request.headers.get("Accept", ""):
                    return aiohttp.web.json_response(self._table(request, self._matching(request)))
                return aiohttp.web.json_response(
                    {
                        "apiVersion": request.resource.group + "/" + request.resource.version
                        if request.resource.group
                        else request.resource.version,
                        "kind": f"{info.kind}List",
                        "metadata": {"resourceVersion": str(self._revision)},
                        "items": self._matching(request),
                    }
                )
            obj = self._live(request.resource, request.namespace, request.name)
            if obj is None:
                return _status(
                    404, "NotFound", f"{request.resource.plural} {request.name!r} not found"
                )
            raw = obj.raw
        if request.subresource == "scale":
            return aiohttp.web.json_response(self._scale(raw))
        if "as=Table" in request.headers.get("Accept", ""):
            return aiohttp.web.json_response(self._table(request, [raw]))
        return aiohttp.web.json_response(raw)

    def _table(self, request: rendering.Request, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Server-side printing (`kubectl get`): NAME plus the CRD's additionalPrinterColumns."""
        columns = [
            {"name": "Name", "type": "string", "format": "name", "jsonPath": ".metadata.name"}
        ]
        columns += self._printer_columns.get(request.resource, [])
        if not self._printer_columns.get(request.resource):
            columns.append(
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
            )
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "Table",
            "metadata": {"resourceVersion": str(self._revision)},
            "columnDefinitions": [
                {
                    "name": c["name"],
                    "type": c["type"],
                    "format": c.get("format", ""),
                    "description": "",
                    "priority": 0,
                }
                for c in columns
            ],
            "rows": [
                {
                    "cells": [_cell(item, c) for c in columns],
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": item["metadata"],
                    },
                }
                for item in items
            ],
        }

    async def _create(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        body = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
        if body is None:
            return _status(400, "BadRequest", "the request body is not a JSON object")
        metadata = body.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        name = metadata.get("name")
        if not name:
            return _status(422, "Invalid", "metadata.name: Required value")
        namespace = request.namespace or metadata.get("namespace")
        if self._info(request.resource).namespaced:
            namespace = namespace or "default"
            metadata["namespace"] = namespace
        else:
            namespace = None
        async with self._lock:
            if self._live(request.resource, namespace, name) is not None:
                return _status(
                    409, "AlreadyExists", f"{request.resource.plural} {name!r} already exists"
                )
            if self._has_status(request.resource):
                body.pop("status", None)
            body = self._defaulted(request.resource, body)
            metadata = body["metadata"]
            metadata.pop("managedFields", None)
            metadata.update(
                uid=str(uuid.uuid4()),
                resourceVersion=self._next_revision(),
                generation=1,
                creationTimestamp=_now(),
            )
            managed_fields.record_update(
                {}, body, managed_fields.manager_of(request), request.subresource, _now()
            )
            existing = self._stored(request.resource, namespace, name)
            if existing is not None:
                existing.history.append(body)
            else:
                self.objects[request.resource, namespace, name] = body
            if request.resource == kmock.resource(CRD_RESOURCE):
                self._register_crd(body)
            await self._publish(request.resource, "ADDED", body)
        return aiohttp.web.json_response(body, status=201)

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            resource = kmock.resource(f"{spec['group']}/{version['name']}/{names['plural']}")
            self._printer_columns[resource] = version.get("additionalPrinterColumns", [])
            self._schemas[resource] = (version.get("schema") or {}).get("openAPIV3Schema") or {}
            self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = (
                kmock.ResourceInfo(
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    kind=names["kind"],
                    singular=names.get("singular", names["kind"].lower()),
                    shortnames=set(names.get("shortNames", [])),
                    categories=set(names.get("categories", [])),
                    subresources=set((version.get("subresources") or {}).keys()),
                    verbs=VERBS,
                )
            )

    def _patched(self, request: rendering.Request, current: dict[str, Any], replace: bool) -> Any:
        if replace:
            return copy.deepcopy(request.data)
        patch = request.data
        if isinstance(patch, list):
            return jsonpatch.apply_patch(current, patch, in_place=False)
        if isinstance(patch, dict):
            return json_merge(current, patch)
        raise ValueError("the patch body is neither a JSON object nor a JSON-patch list")

    async def _modify(
        self, request: rendering.Request, replace: bool
    ) -> aiohttp.web.StreamResponse:
        async with self._lock:
            obj = self._live(request.resource, request.namespace, request.name)
            if obj is None:
                return _status(
                    404, "NotFound", f"{request.resource.plural} {request.name!r} not found"
                )
            current = copy.deepcopy(obj.raw)
            target = current
            if request.subresource == "scale":
                target = {"spec": {"replicas": current.get("spec", {}).get("replicas", 0)}}
            try:
                patched = self._patched(request, target, replace)
            except jsonpatch.JsonPatchTestFailed as error:
                return _status(422, "Invalid", f"the JSON-patch test failed: {error}")
            except (
                jsonpatch.JsonPatchException,
                jsonpatch.JsonPointerException,
                ValueError,
            ) as error:
                return _status(422, "Invalid", f"cannot apply the patch: {error}")
            new = self._defaulted(
                request.resource, self._merge_subresource(request, current, patched)
            )
            rv_sent = (patched.get("metadata") or {}).get("resourceVersion")
            if replace and rv_sent and rv_sent != current["metadata"]["resourceVersion"]:
                return _status(409, "Conflict", "the object has been modified")
            new["metadata"].update(
                {k: current["metadata"][k] for k in ("uid", "creationTimestamp", "generation")}
            )
            # managedFields are the server's record: what a client sends there is not taken.
            new["metadata"]["managedFields"] = copy.deepcopy(
                current["metadata"].get("managedFields") or []
            )
            managed_fields.record_update(
                current, new, managed_fields.manager_of(request), request.subresource, _now()
            )
            new["metadata"]["resourceVersion"] = self._next_revision()
            essence = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if essence(new) != essence(current):
                new["metadata"]["generation"] = current["metadata"]["generation"] + 1
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                obj.delete()
                await self._publish(request.resource, "DELETED", new)
                await self._collect_garbage(meta["uid"])
            else:
                obj.history.append(new)
                await self._publish(request.resource, "MODIFIED", new)
        if request.subresource == "scale":
            return aiohttp.web.json_response(self._scale(new))
        return aiohttp.web.json_response(new)

    async def _server_side_apply(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """PATCH with application/apply-patch+yaml: create or merge the applied configuration,
        remove what this manager applied before and applies no more, refuse (409) to change a
        field another manager set to another value unless force=true."""
        manager = request.params.get("fieldManager")
        if not manager:
            return _status(400, "BadRequest", "fieldManager is required for apply requests")
        applied = request.data if isinstance(request.data, dict) else None
        if applied is None:
            return _status(400, "BadRequest", "the apply body is not a YAML/JSON object")
        if request.subresource is not None:
            return _status(400, "BadRequest", "this test server applies only to whole objects")
        force = request.params.get("force") in ("true", "1")
        async with self._lock:
            obj = self._live(request.resource, request.namespace, request.name)
            if obj is None:
                body = copy.deepcopy(applied)
                metadata = body.setdefault("metadata", {})
                metadata["namespace"] = request.namespace
                metadata["name"] = request.name
                body.pop("status", None) if self._has_status(request.resource) else None
                body = self._defaulted(request.resource, body)
                metadata = body["metadata"]
                metadata.update(
                    uid=str(uuid.uuid4()),
                    resourceVersion=self._next_revision(),
                    generation=1,
                    creationTimestamp=_now(),
                    managedFields=[],
                )
                managed_fields.record_apply({}, body, applied, manager, _now())
                existing = self._stored(request.resource, request.namespace, request.name)
                if existing is not None:
                    existing.history.append(body)
                else:
                    self.objects[request.resource, request.namespace, request.name] = body
                await self._publish(request.resource, "ADDED", body)
                return aiohttp.web.json_response(body, status=201)
            current = copy.deepcopy(obj.raw)
            conflicts = managed_fields.conflicts(current, applied, manager)
            if conflicts and not force:
                return _status(
                    409, "Conflict", "Apply failed with conflicts: " + "; ".join(conflicts)
                )
            new = self._defaulted(
                request.resource, managed_fields.applied_object(current, applied, manager)
            )
            if self._has_status(request.resource):
                new["status"] = current.get("status")
                if new["status"] is None:
                    new.pop("status")
            new["metadata"].update(
                {k: current["metadata"][k] for k in ("uid", "creationTimestamp", "generation")}
            )
            managed_fields.record_apply(current, new, applied, manager, _now())
            essence = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if new == current:
                return aiohttp.web.json_response(current)
            new["metadata"]["resourceVersion"] = self._next_revision()
            if essence(new) != essence(current):
                new["metadata"]["generation"] = current["metadata"]["generation"] + 1
            obj.history.append(new)
            await self._publish(request.resource, "MODIFIED", new)
        return aiohttp.web.json_response(new)

    def _defaulted(self, resource: Any, body: dict[str, Any]) -> dict[str, Any]:
        """What the API server does to a custom resource before storing it: its CRD's defaults."""
        schema = self._schemas.get(resource)
        return apply_defaults(schema, body) if schema else body

    def _merge_subresource(
        self, request: rendering.Request, current: dict[str, Any], patched: dict[str, Any]
    ) -> dict[str, Any]:
        if request.subresource == "status":
            return {**current, "status": patched.get("status", current.get("status"))}
        if request.subresource == "scale":
            replicas = (patched.get("spec") or {}).get("replicas")
            return {**current, "spec": {**current.get("spec", {}), "replicas": replicas}}
        if self._has_status(request.resource):
            patched = {k: v for k, v in patched.items() if k != "status"}
            if "status" in current:
                patched["status"] = current["status"]
        patched.setdefault("metadata", {})
        return patched

    async def _delete(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        async with self._lock:
            obj = self._live(request.resource, request.namespace, request.name)
            if obj is None:
                return _status(
                    404, "NotFound", f"{request.resource.plural} {request.name!r} not found"
                )
            raw = copy.deepcopy(obj.raw)
            if raw["metadata"].get("finalizers"):
                if not raw["metadata"].get("deletionTimestamp"):
                    raw["metadata"]["deletionTimestamp"] = _now()
                    raw["metadata"]["resourceVersion"] = self._next_revision()
                    obj.history.append(raw)
                    await self._publish(request.resource, "MODIFIED", raw)
                return aiohttp.web.json_response(raw, status=202)
            obj.delete()
            await self._publish(request.resource, "DELETED", raw)
            await self._collect_garbage(raw["metadata"]["uid"])
            if request.resource == kmock.resource(CRD_RESOURCE):
                await self._unregister_crd(raw)
        return aiohttp.web.json_response(raw)

    async def _unregister_crd(self, crd: dict[str, Any]) -> None:
        """What deleting a CRD does: its objects go, its resource is no longer served (404), and
        watches on it end."""
        spec = crd["spec"]
        for version in spec["versions"]:
            key = f"{spec['group']}/{version['name']}/{spec['names']['plural']}"
            resource = kmock.resource(key)
            for (r, namespace, name), obj in list(self.objects.items()):
                if r == resource:
                    if not obj.deleted:
                        raw = copy.deepcopy(obj.raw)
                        obj.delete()
                        await self._publish(resource, "DELETED", raw)
                    # Gone from the store too: KMock's discovery lists every stored resource.
                    del self.objects[r, namespace, name]
            self.resources.pop(key, None)
            self._printer_columns.pop(resource, None)
            self._schemas.pop(resource, None)
            await self._buses[resource].put(RESOURCE_GONE)

    async def _collect_garbage(self, owner_uid: str) -> None:
        """What the garbage collector does: delete the dependents of a deleted owner."""
        for (resource, _, _), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs):
                raw = copy.deepcopy(obj.raw)
                obj.delete()
                await self._publish(resource, "DELETED", raw)
                await self._collect_garbage(raw["metadata"]["uid"])

    async def _watch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        raw_request = request._raw_request
        response = aiohttp.web.StreamResponse(
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        await response.prepare(raw_request)
        timeout = float(request.params.get("timeoutSeconds") or self.watch_timeout_s)
        selector = request.params.get("labelSelector")

        def visible(event: dict[str, Any]) -> bool:
            meta = event["object"].get("metadata", {})
            return (
                (request.namespace is None or meta.get("namespace") == request.namespace)
                and (request.name is None or meta.get("name") == request.name)
                and _selector_matches(selector, meta.get("labels") or {})
            )

        bus = self._buses[request.resource]

        async def stream() -> None:
            async with self._lock:
                # Mark the bus with the snapshot, so that no change between them is lost.
                marker = await bus.mark()
                since = request.params.get("resourceVersion")
                if since and since != "0":
                    initial = [
                        event
                        for revision, resource, event in self._events
                        if resource == request.resource and revision > int(since)
                    ]
                else:
                    initial = [{"type": "ADDED", "object": raw} for raw in self._matching(request)]
            try:
                for event in initial:
                    if visible(event):
                        await response.write(json.dumps(event).encode() + b"\n")
                async for event in bus.stream(since=marker):
                    if event == RESOURCE_GONE:
                        break
                    if visible(event):
                        await response.write(json.dumps(event).encode() + b"\n")
            finally:
                await bus.unmark(marker)

        with contextlib.suppress(TimeoutError, ConnectionResetError, asyncio.CancelledError):
            await asyncio.wait_for(stream(), timeout=timeout)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


def _cell(item: dict[str, Any], column: dict[str, Any]) -> Any:
    value = _json_path(item, column["jsonPath"])
    if column["type"] != "date" or not value:
        return value
    # Server-side printing shows dates as ages, as kubectl users expect.
    then = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    seconds = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _json_path(obj: Any, path: str) -> Any:
    """The JSONPath subset of printer columns: `.a.b` and `.a[?(@.k=="v")].b`."""
    for match in re.finditer(r'\.([A-Za-z0-9_]+)|\[\?\(@\.([A-Za-z0-9_]+)=="([^"]*)"\)\]', path):
        field, key, value = match.groups()
        if field is not None:
            obj = obj.get(field) if isinstance(obj, dict) else None
        else:
            obj = next((x for x in obj or [] if isinstance(x, dict) and x.get(key) == value), None)
    return obj


def json_merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are treated the same way)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge(result.get(key), value)
    return result


class KubeApiThread:
    """A `KubeApi` served on 127.0.0.1 from its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.api: KubeApi | None = None
        self.url = ""
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with KubeApi() as api, kmock.Server(api) as server:
            self.api = api
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> KubeApiThread:
        # One access-log line per request would drown the operator's own log in test reports.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the KMock API server did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)

    def call(self, fn: Callable[[KubeApi], Any]) -> Any:
        """Run `fn(api)` on the server's loop (a coroutine function is awaited) and return its result."""

        async def runner() -> Any:
            result = fn(self.api)
            return await result if asyncio.iscoroutine(result) else result

        future: Future[Any] = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        return future.result(timeout=30)

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@contextlib.contextmanager
def running_kube_api() -> Iterator[KubeApiThread]:
    server = KubeApiThread().start()
    try:
        yield server
    finally:
        server.stop()
