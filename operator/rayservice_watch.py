"""Mirror KubeRay's RayService status into the owning GrokDeployment's status as it changes.

Our own watch rather than a kopf handler on RayServices: kopf ends the whole operator when a
watched resource stops being served (KubeRay's CRD deleted: the watch gets a 404), and it starts no
watch when a CRD's discovery lags its creation (KubeRay installed after the operator). This watch
waits until `ray.io/v1 rayservices` is served, lists, watches, and starts over with backoff whenever
the stream fails; the periodic resync covers whatever happens while it is not watching.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from grokserve.operator.kube import RAYSERVICE, Kube, WatchStream

# Only the RayServices the operator makes (the builders' labels).
SELECTOR = "app.kubernetes.io/managed-by=grokserve-operator"
WATCH_TIMEOUT_S = 60
# Backoff after a failed list or watch, and how often to look whether KubeRay's CRD is served.
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
ABSENT_POLL_S = 10.0

logger = logging.getLogger(__name__)


class RayServiceWatch:
    """A daemon thread that calls `mirror(rayservice)` for every RayService added or modified;
    `mirror` says whether it was its to mirror (a standby peer's is not)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str | None,
        mirror: Callable[[dict[str, Any]], bool],
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.mirror = mirror
        self._stopping = threading.Event()
        self._stream: WatchStream | None = None
        where = namespace or "all namespaces"
        self._thread = threading.Thread(
            target=self._run, name=f"rayservice-watch ({where})", daemon=True
        )

    def start(self) -> RayServiceWatch:
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
                logger.warning(f"RayService watch failed, retrying in {delay:g} s: {error}")
                version = None
            self._stopping.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _watch(self, version: str | None) -> str | None:
        """One list (when `version` is None) and one watch; returns where to resume, None to
        list again."""
        if version is None:
            if not self.kube.serves(RAYSERVICE):
                self._stopping.wait(ABSENT_POLL_S)
                return None
            listing = self.kube.list(RAYSERVICE, self.namespace, SELECTOR)
            for item in listing.get("items") or []:
                self._mirror(item)
            version = listing["metadata"]["resourceVersion"]
        self._stream = self.kube.watch(
            RAYSERVICE, self.namespace, SELECTOR, version, WATCH_TIMEOUT_S
        )
        if self._stopping.is_set():  # stopped while the request was being made
            self._stream.close()
        for event in self._stream:
            if self._stopping.is_set():
                return None
            if event.get("type") == "ERROR":
                return None  # e.g. 410 Gone: the version is too old; list again
            if event.get("type") in ("ADDED", "MODIFIED"):
                self._mirror(event["object"])
            version = (event["object"].get("metadata") or {}).get("resourceVersion", version)
        # The stream ended: at its timeout, or because the resource stopped being served.
        return version if self.kube.serves(RAYSERVICE) else None

    def _mirror(self, rayservice: dict[str, Any]) -> None:
        meta = rayservice.get("metadata") or {}
        try:
            mirrored = self.mirror(rayservice)
        except Exception as error:  # one owner's failure must not stop the others
            logger.warning(
                f"RayService {meta.get('namespace')}/{meta.get('name')}: status not mirrored: {error}"
            )
        else:
            if mirrored:
                logger.debug(f"RayService {meta.get('namespace')}/{meta.get('name')} mirrored")
