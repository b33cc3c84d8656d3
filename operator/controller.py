"""Reconcile on change: watch events queue the GrokDeployment they concern, a bounded pool of
workers runs the passes, and a rare resync queues every GrokDeployment once per period.

A pass reads the GrokDeployment and its children from the cache the watches keep, applies only the
children that differ from what it would apply, and writes the status only when it would change, so
a pass over an unchanged object makes no API request at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
import urllib3
from kubernetes.client.rest import ApiException

from grokserve.operator import metrics
from grokserve.operator.autoscaling.policy import MetricFailure
from grokserve.operator.autoscaling.prometheus import FailureReason, read_loading_progress
from grokserve.operator.builders import DEPLOYMENT_LABEL, build_children
from grokserve.operator.cache import CachedKube, ChildrenMemo, ObjectCache, key_of
from grokserve.operator.child_watch import ChildWatch
from grokserve.operator.kube import GROKDEPLOYMENT, RESOURCES, Kube, Resource
from grokserve.operator.peering import PeeringGate
from grokserve.operator.reconcile import (
    BuildChildren,
    LoadingProbe,
    Outcome,
    api_failure,
    reconcile,
)
from grokserve.operator.spec import KIND
from grokserve.operator.status import LoadingProgress
from grokserve.operator.workqueue import Key, ReconcileQueue, resync

LOG = logging.getLogger("grokserve.operator")
# How long the start waits for the watches' first listings before working without them.
SYNC_TIMEOUT_S = 30.0
# While replicas may be loading weights, how often Prometheus is asked how far they are (about
# the ServiceMonitor's scrape interval: asking more often learns nothing new).
LOADING_POLL_S = 15.0
# Passes that events bring (KubeRay reporting) reuse an answer younger than this.
LOADING_REUSE_S = 5.0
LOADING_QUERY_TIMEOUT_S = 3.0
NO_SERIES = str(FailureReason.NO_SERIES)  # no replica reports loading: nothing to log


def run_pass(
    kube: Kube,
    body: dict[str, Any],
    build: BuildChildren = build_children,
    loading: LoadingProbe | None = None,
) -> Outcome:
    """One reconcile pass over `body`, the GrokDeployment as last seen: children, then status.

    The status is written from the object as stored at write time, not from `body`: the
    autoscaler may have set its ScalingActive condition in the same conditions list meanwhile.
    """
    meta = body["metadata"]
    started = time.perf_counter()
    try:
        outcome = reconcile(kube, body, build, loading)
        kube.update_status(
            GROKDEPLOYMENT,
            meta["namespace"],
            meta["name"],
            lambda stored: outcome.status(stored.get("status")),
            known=body,
        )
    except Exception:
        metrics.RECONCILE_SECONDS.labels("error").observe(time.perf_counter() - started)
        raise
    metrics.RECONCILE_SECONDS.labels("ok").observe(time.perf_counter() - started)
    metrics.record(
        meta["namespace"], meta["name"], outcome.desired_replicas, outcome.ready_replicas,
        outcome.ready,
    )  # fmt: skip
    return outcome


def owner_name(child: dict[str, Any]) -> str | None:
    """The GrokDeployment that controls this child (its controller ownerReference)."""
    for ref in child["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND:
            return str(ref["name"])
    return (child["metadata"].get("labels") or {}).get(DEPLOYMENT_LABEL)


def _essence(body: dict[str, Any]) -> Any:
    """What a child's owner cares about, apart from its status."""
    meta = body["metadata"]
    kept = {k: meta.get(k) for k in ("labels", "annotations", "ownerReferences")}
    return kept, {k: v for k, v in body.items() if k not in ("metadata", "status")}


class Controller:
    """The reconcile queue, its workers (threads of one executor: the client is synchronous) and
    the resync loop of one operator."""

    def __init__(
        self,
        kube: CachedKube,
        workers: int,
        resync_s: float,
        namespaces: list[str] | None = None,
        peering: tuple[str, str, int] | None = None,
    ) -> None:
        self.kube = kube
        self.namespaces: list[str | None] = [*namespaces] if namespaces else [None]
        # kopf lets only the active peer run its handlers; the workers ask the same question
        # (kopf peers in a ClusterKopfPeering when all namespaces are watched, else per namespace).
        self._gates = {
            namespace: PeeringGate(Kube(kube.api), *peering, namespace=namespace)
            for namespace in self.namespaces
            if peering is not None
        }
        self.cache: ObjectCache = kube.cache
        self.queue = ReconcileQueue()
        self.children = ChildrenMemo()
        self.workers = workers
        self.resync_s = resync_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="reconcile")
        self._tasks: list[asyncio.Task[None]] = []
        self._watches: list[ChildWatch] = []
        # The context of a kopf event handler: kopf.warn posts Events through a queue it sets
        # there, and the workers post theirs from it.
        self._posting: contextvars.Context | None = None
        # Prometheus' last answer on each deployment's weights loading, and when it came (one
        # deployment's passes never overlap: the queue serialises them).
        self._loading_answers: dict[Key, tuple[float, LoadingProgress | MetricFailure]] = {}

    async def start(self) -> None:
        """Watch the children (one thread per kind and namespace), wait for their first listings,
        then start working: a pass that ran before would take every existing child for a missing
        one."""
        loop = asyncio.get_running_loop()
        for kind, resource in RESOURCES.items():
            for namespace in self.namespaces:

                def on_event(event: dict[str, Any], kind: str = kind) -> None:
                    loop.call_soon_threadsafe(self.child_event, kind, event)

                def on_served(served: bool, resource: Resource = resource) -> None:
                    loop.call_soon_threadsafe(self.served, resource, served)

                watch = ChildWatch(
                    Kube(self.kube.api),  # discovery asked afresh: the watch reports it
                    kind,
                    resource,
                    namespace,
                    on_event,
                    on_served,
                )
                self._watches.append(watch.start())
        for watch in self._watches:
            await loop.run_in_executor(None, watch.synced.wait, SYNC_TIMEOUT_S)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        self._tasks.append(
            asyncio.create_task(resync(self.queue, lambda: self.cache.names(KIND), self.resync_s))
        )

    async def stop(self) -> None:
        for watch in self._watches:
            watch.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def served(self, resource: Resource, served: bool) -> None:
        """A watch found whether its resource is served: a CRD installed (KubeRay after the
        operator) or deleted concerns every GrokDeployment."""
        if self.kube.discovered(resource, served):
            for namespace, name in self.cache.names(KIND):
                self.queue.add((namespace, name))

    # -- events (from kopf's watches, on the event loop) ---------------------------------------

    def grokdeployment_event(self, event: dict[str, Any]) -> None:
        self._posting = contextvars.copy_context()
        body = {"kind": KIND, **event["object"]}
        kind, namespace, name = key_of(body)
        if event.get("type") == "DELETED":
            self.cache.remove(kind, namespace, name)
            self.queue.forget((namespace, name))
            self.children.forget(namespace, name)
            self._loading_answers.pop((namespace, name), None)
            metrics.forget(namespace, name)
            return
        # Children carry ownerReferences: the garbage collector deletes them with their owner.
        if self.cache.put(body) and not body["metadata"].get("deletionTimestamp"):
            self.queue.add((namespace, name))

    def child_event(self, kind: str, event: dict[str, Any]) -> None:
        body = {"kind": kind, **event["object"]}
        _, namespace, name = key_of(body)
        owner = owner_name(body)
        if event.get("type") == "DELETED":
            self.kube.forget(kind, namespace, name)
            if owner:
                self.queue.add((namespace, owner))
            return
        before = self.cache.get(kind, namespace, name)
        if not self.cache.put(body) or not owner:
            return  # seen already (the answer to our own write), or not a GrokDeployment's
        # Only the status changed (KubeRay reporting): the owner's status follows first.
        urgent = before is not None and _essence(before) == _essence(body)
        self.queue.add((namespace, owner), urgent=urgent)

    # -- workers ------------------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self.queue.take()
            try:
                outcome = await loop.run_in_executor(self._executor, self._pass, key)
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                # Transient (refusals are outcomes already): record it where users look, and
                # try again after a backoff rather than at once.
                retry_in = self.queue.done(key, failed=True)
                LOG.warning("reconciling %s/%s failed, retrying in %s s: %s", *key, retry_in, error)
                await loop.run_in_executor(
                    self._executor, self._record_failure, key, error, retry_in
                )
                continue
            except Exception:
                retry_in = self.queue.done(key, failed=True)
                LOG.exception("reconciling %s/%s failed, retrying in %s s", *key, retry_in)
                continue
            self.queue.done(key)
            if outcome is not None and outcome.warning is not None:
                self._warn(key, outcome.warning)
            if outcome is not None and outcome.watches_loading:
                self.queue.add_after(key, LOADING_POLL_S)

    def _record_failure(self, key: Key, error: Exception, retry_in: float | None) -> None:
        body = self.cache.get(KIND, *key)
        if body is None:
            return
        api_error = error if isinstance(error, ApiException) else ApiException(reason=str(error))
        outcome = api_failure(body, api_error, retry_in or 0)
        with contextlib.suppress(ApiException, urllib3.exceptions.HTTPError):
            self.kube.update_status(
                GROKDEPLOYMENT,
                *key,
                lambda stored: outcome.status(stored.get("status")),
                known=body,
            )

    def _pass(self, key: Key) -> Outcome | None:
        body = self.cache.get(KIND, *key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        gate = self._gates.get(None if None in self._gates else key[0])
        if gate is not None and not gate.active():
            return None  # a standby peer: the active one reconciles
        return run_pass(self.kube, body, self.children, self._loading_progress)

    def _loading_progress(self, url: str, namespace: str, name: str) -> LoadingProgress | None:
        """What Prometheus says of the weights loading, asked at most every LOADING_REUSE_S per
        deployment; None (and a log line when the cause changes) when it cannot say: the status
        then just lacks progress."""
        key = (namespace, name)
        asked, before = self._loading_answers.get(key, (-LOADING_REUSE_S, None))
        if time.monotonic() - asked < LOADING_REUSE_S and before is not None:
            answer = before
        else:
            try:
                answer = read_loading_progress(url, namespace, name, LOADING_QUERY_TIMEOUT_S)
            except ValueError as error:  # a URL the client refuses
                answer = MetricFailure("InvalidURL", str(error))
            self._loading_answers[key] = (time.monotonic(), answer)
            if isinstance(answer, MetricFailure) and answer.reason != NO_SERIES:
                logged = isinstance(before, MetricFailure) and before.reason == answer.reason
                if not logged:
                    LOG.warning(
                        "loading progress of %s/%s unknown: %s", namespace, name, answer.message
                    )
        return answer if isinstance(answer, LoadingProgress) else None

    def _warn(self, key: Key, warning: tuple[str, str]) -> None:
        body = self.cache.get(KIND, *key)
        if body is None or self._posting is None:
            return
        reason, message = warning
        # kopf types the object as its Body view; the posting reads only the stored object's
        # apiVersion, kind and metadata, which the cached dict has.
        self._posting.run(kopf.warn, cast(kopf.Body, body), reason=reason, message=message)
