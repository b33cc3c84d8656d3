"""What the operator last saw of its GrokDeployments and their children, and the reconcile's view
of the cluster through it: reads come from there, and a write goes out only when it would change
something.

kopf's watches feed the cache (`ObjectCache.put`), and so does every answer to the operator's own
writes, so that the watch event echoing a write is recognised and does not start another pass. A
child absent from the cache is still read from the API server before it is created: the watches
only see children labelled as ours, and a name held by someone else must be found (ChildConflict).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from grokserve.model.placement import Plan
from grokserve.operator import metrics
from grokserve.operator.builders import Owner, build_children
from grokserve.operator.kube import GROKDEPLOYMENT, RESOURCES, Kube, Resource
from grokserve.operator.spec import API_GROUP, KIND, GrokDeploymentSpec

# The hash of the configuration the operator last applied to a child. Server-side apply removes
# the fields we applied before and apply no more: without this record, a child that holds every
# field we apply now could still hold one we stopped applying.
APPLIED_ANNOTATION = f"{API_GROUP}/applied-configuration"
KINDS: dict[Resource, str] = {GROKDEPLOYMENT: KIND} | {r: k for k, r in RESOURCES.items()}

Key = tuple[str, str, str]  # kind, namespace, name
LOG = logging.getLogger("grokserve.operator")


def key_of(body: dict[str, Any]) -> Key:
    metadata = body["metadata"]
    return body["kind"], metadata["namespace"], metadata["name"]


def _revision(body: dict[str, Any]) -> int | None:
    version = body["metadata"].get("resourceVersion")
    return int(version) if isinstance(version, str) and version.isdigit() else None


class ObjectCache:
    """The latest version seen of each object, by kind, namespace and name (thread-safe: kopf's
    event loop and the reconcile workers both write to it)."""

    def __init__(self) -> None:
        self._objects: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def put(self, body: dict[str, Any]) -> bool:
        """Keep `body` unless an as new or newer version is kept; whether it was kept.

        resourceVersions are opaque to clients, but every API server we know numbers them in
        order; where they are not numbers, a different one counts as newer."""
        key = key_of(body)
        with self._lock:
            kept = self._objects.get(key)
            if kept is not None:
                old, new = _revision(kept), _revision(body)
                if old is not None and new is not None and new <= old:
                    return False
                if kept["metadata"].get("resourceVersion") == body["metadata"].get(
                    "resourceVersion"
                ):
                    return False
            self._objects[key] = body
            return True

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((kind, namespace, name))

    def remove(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects.pop((kind, namespace, name), None)

    def names(self, kind: str) -> list[tuple[str, str]]:
        """(namespace, name) of every cached object of this kind."""
        with self._lock:
            return [(ns, name) for k, ns, name in self._objects if k == kind]


def applied_hash(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def holds(observed: Any, desired: Any) -> bool:
    """Whether `observed` has every field `desired` sets, with its value (lists item by item).

    What others add (the API server's defaults, other managers' fields, status) does not count."""
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(
            key in observed and holds(observed[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(desired)
            and all(holds(o, d) for o, d in zip(observed, desired, strict=True))
        )
    return bool(observed == desired)


def annotated(body: dict[str, Any]) -> dict[str, Any]:
    """`body` recording its own hash in the APPLIED_ANNOTATION."""
    metadata = body["metadata"]
    annotations = {**(metadata.get("annotations") or {}), APPLIED_ANNOTATION: applied_hash(body)}
    return {**body, "metadata": {**metadata, "annotations": annotations}}


class ChildrenMemo:
    """`build_children`, remembered per owner for the spec it was last built from: a resync
    pass over an unchanged object compares instead of rendering serve configs again."""

    def __init__(self) -> None:
        self._built: dict[Owner, tuple[tuple[str, Any], list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def __call__(
        self, owner: Owner, spec: GrokDeploymentSpec, plan: Plan, **options: Any
    ) -> list[dict[str, Any]]:
        # The plan follows from the spec (and the owner's name): the spec and the options
        # (with_servicemonitor, the serving cluster KubeRay routes to) are the key.
        rendered = (spec.model_dump_json(), tuple(sorted(options.items())))
        with self._lock:
            built = self._built.get(owner)
        if built is not None and built[0] == rendered:
            return built[1]
        children = build_children(owner, spec, plan, **options)
        with self._lock:
            self._built[owner] = (rendered, children)
        return children

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            for owner in [o for o in self._built if (o.namespace, o.name) == (namespace, name)]:
                del self._built[owner]


class CachedKube(Kube):
    """The Kube client, reading children and discovery from the cache and skipping writes that
    would change nothing (counted in grokserve_operator_writes_skipped_total)."""

    def __init__(self, api: Any, cache: ObjectCache) -> None:
        super().__init__(api)
        self.cache = cache
        self._served: dict[Resource, bool] = {}
        self._discovering = threading.Lock()
        # Children found to hold what is applied: (resourceVersion, applied hash) when found.
        # The same version of the same child holds the same configuration: no need to compare.
        self._held: dict[Key, tuple[str, str]] = {}

    def serves(self, resource: Resource) -> bool:
        """As last found: the children's watches report when their resource starts or stops
        being served; until one has, the API server is asked."""
        # One worker asks; the others wait for its answer rather than ask too.
        with self._discovering:
            known = self._served.get(resource)
            if known is None:
                known = self._served[resource] = super().serves(resource)
            return known

    def discovered(self, resource: Resource, served: bool) -> bool:
        """Record whether `resource` is served; whether that is news."""
        with self._discovering:
            news = self._served.get(resource) != served
            self._served[resource] = served
            return news

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        kind = KINDS.get(resource)
        # Only namespaced children are cached; cluster-scoped reads (peering) go to the server.
        cached = (
            self.cache.get(kind, namespace, name)
            if kind and kind != KIND and namespace is not None
            else None
        )
        return cached if cached is not None else super().get(resource, namespace, name)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        desired = annotated(body)
        key = key_of(body)
        observed = self.cache.get(*key)
        if observed is not None:
            seen = (
                observed["metadata"].get("resourceVersion"),
                desired["metadata"]["annotations"][APPLIED_ANNOTATION],
            )
            if self._held.get(key) == seen or holds(observed, desired):
                self._held[key] = seen
                metrics.WRITES_SKIPPED.labels(body["kind"]).inc()
                return observed
        stored = super().apply(desired)
        self.cache.put({"kind": body["kind"], **stored})
        LOG.info("%s %s/%s applied", body["kind"], *key_of(body)[1:])
        return stored

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object was deleted."""
        self.cache.remove(kind, namespace, name)
        self._held.pop((kind, namespace, name), None)

    def update_status(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        status_for: Callable[[dict[str, Any]], dict[str, Any] | None],
        known: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        kind = KINDS[resource]
        known = known or self.cache.get(kind, namespace, name)
        written = super().update_status(resource, namespace, name, status_for, known)
        if written is not None:
            self.cache.put({"kind": kind, **written})
            LOG.info("%s %s/%s: status written", kind, namespace, name)
        return written
