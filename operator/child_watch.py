"""Watch one kind of child (RayServices, Services, ...) and report every change to the operator.

Our own watch rather than a kopf handler: kopf ends the whole operator when a watched resource
stops being served (KubeRay's CRD deleted: the watch gets a 404), and it starts no watch when a
CRD's discovery lags its creation (KubeRay installed after the operator). This watch waits until
the resource is served, lists, watches, and starts over with backoff whenever the stream fails;
it says when the resource starts or stops being served, and the periodic resync covers whatever
happens while it is not watching.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from grokserve.operator.kube import Kube, Resource, WatchStream

# Only the children the operator makes (the builders' labels).
SELECTOR = "app.kubernetes.io/managed-by=grokserve-operator"
WATCH_TIMEOUT_S = 60
# Backoff after a failed list or watch, and how often to look whether KubeRay's CRD is served.
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
ABSENT_POLL_S = 10.0

logger = logging.getLogger(__name__)


class ChildWatch:
    """A daemon thread that calls `on_event(event)` for every object of `kind` listed (type None),
    added, modified or deleted, and `on_served(served)` when it finds whether `kind` is served."""

    def __init__(
        self,
        kube: Kube,
        kind: str,
        resource: Resource,
        namespace: str | None,
        on_event: Callable[[dict[str, Any]], None],
        on_served: Callable[[bool], None],
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.resource = resource
        self.namespace = namespace
        self.on_event = on_event
        self.on_served = on_served
        # Set once the first listing was reported, the resource found not served, or the first
        # try failed.
        self.synced = threading.Event()
        self._stopping = threading.Event()
        self._stream: WatchStream | None = None
        where = namespace or "all namespaces"
        self._thread = threading.Thread(
            target=self._run, name=f"{kind} watch ({where})", daemon=True
        )

    def start(self) -> ChildWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread: its watch request is cut (other requests last at most 30 s)."""
        self._stopping.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    def _run(self) -> None:
        delay = RETRY_MIN_S
        version: str | None = None
        while not self._stopping.is_set():
            try:
                version = self._watch(version)
                delay = RETRY_MIN_S
                continue
            except Exception as error:  # never let the watch die: say why, retry
                if self._stopping.is_set():
                    return  # the stop cut the request
                logger.warning(f"{self.kind} watch failed, retrying in {delay:g} s: {error}")
                version = None
                # Not listed (e.g. RBAC refuses it): the passes read what they need meanwhile.
                self.synced.set()
            self._stopping.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _watch(self, version: str | None) -> str | None:
        """One list (when `version` is None) and one watch; returns where to resume, None to
        list again."""
        if version is None:
            served = self.kube.serves(self.resource)
            self.on_served(served)
            if not served:
                self.synced.set()
                self._stopping.wait(ABSENT_POLL_S)
                return None
            listing = self.kube.list(self.resource, self.namespace, SELECTOR)
            for item in listing.get("items") or []:
                self._report({"type": None, "object": item})
            self.synced.set()
            version = listing["metadata"]["resourceVersion"]
        self._stream = self.kube.watch(
            self.resource, self.namespace, SELECTOR, version, WATCH_TIMEOUT_S
        )
        if self._stopping.is_set():  # stopped while the request was being made
            self._stream.close()
        for event in self._stream:
            if self._stopping.is_set():
                return None
            if event.get("type") == "ERROR":
                return None  # e.g. 410 Gone: the version is too old; list again
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                self._report(event)
            version = (event["object"].get("metadata") or {}).get("resourceVersion", version)
        # The stream ended: at its timeout, or because the resource stopped being served.
        if self.kube.serves(self.resource):
            return version
        self.on_served(False)
        return None

    def _report(self, event: dict[str, Any]) -> None:
        meta = event["object"].get("metadata") or {}
        try:
            self.on_event({**event, "object": {"kind": self.kind, **event["object"]}})
        except Exception as error:  # one object's failure must not stop the others
            logger.warning(
                f"{self.kind} {meta.get('namespace')}/{meta.get('name')}: event lost: {error}"
            )
