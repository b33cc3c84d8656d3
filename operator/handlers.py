"""kopf handlers: reconcile GrokDeployments on create, update, resume and periodically.

Run with `grokserve operator` (or `kopf run -m grokserve.operator.handlers`). Every pass is
idempotent: children have fixed names and are created or updated in place, so a restarted operator
adopts what it made before instead of duplicating it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from grokserve.operator import metrics
from grokserve.operator.autoscaling.daemon import register as register_autoscaler
from grokserve.operator.builders import DEPLOYMENT_LABEL
from grokserve.operator.kube import GROKDEPLOYMENT, Kube
from grokserve.operator.peering import PeeringGate
from grokserve.operator.rayservice_watch import RayServiceWatch
from grokserve.operator.reconcile import Outcome, api_failure, observable, observe, reconcile
from grokserve.operator.spec import API_GROUP, API_VERSION, PLURAL

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
# Periodic passes repair deleted children, notice KubeRay (or the Prometheus Operator) being
# installed later, and refresh the status from the RayService's should its watch have missed it.
RESYNC_SECONDS = float(os.environ.get("GROKSERVE_RESYNC_SECONDS", "30"))
# Backoff of a pass that failed on a transient API error (5xx, 409, 429, no connection).
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0


def _api_client() -> client.ApiClient:
    # The kubernetes client reads $KUBECONFIG only when it is imported; pass it explicitly.
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        configuration = client.Configuration()
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
        return client.ApiClient(configuration)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # only problems become Events
    memo.kube = Kube(_api_client())
    # `grokserve operator` passes its namespaces (else all) and its peering (name, identity,
    # priority; else standalone) in the memo.
    namespaces = getattr(memo, "namespaces", None) or [None]
    peering = getattr(memo, "peering", None)
    memo.rayservice_watches = []
    for namespace in namespaces:
        # kopf peers in a ClusterKopfPeering when all namespaces are watched, else per namespace.
        gate = None if peering is None else PeeringGate(memo.kube, *peering, namespace=namespace)
        mirror = partial(mirror_rayservice, memo.kube, gate)
        memo.rayservice_watches.append(RayServiceWatch(memo.kube, namespace, mirror).start())


def _timed(step: Callable[[], Outcome], body: dict[str, Any]) -> Outcome:
    started = time.perf_counter()
    try:
        outcome = step()
    except Exception:
        metrics.RECONCILE_SECONDS.labels("error").observe(time.perf_counter() - started)
        raise
    metrics.RECONCILE_SECONDS.labels("ok").observe(time.perf_counter() - started)
    meta = body["metadata"]
    metrics.record(
        meta["namespace"],
        meta["name"],
        outcome.desired_replicas,
        outcome.ready_replicas,
        outcome.ready,
    )
    if outcome.warning is not None:
        reason, message = outcome.warning
        kopf.warn(body, reason=reason, message=message)
    return outcome


def retry_delay(retry: int) -> float:
    """Seconds before retrying a pass that failed on a transient API error: exponential, capped."""
    return min(RETRY_FIRST_S * 2**retry, RETRY_MAX_S)


def _reconcile(body: kopf.Body, memo: kopf.Memo, retry: int = 0) -> None:
    meta = body["metadata"]
    try:
        outcome = _timed(lambda: reconcile(memo.kube, dict(body)), body)
    except (ApiException, urllib3.exceptions.HTTPError) as error:
        # Transient (refusals are outcomes already): record it where users look, then let kopf
        # retry later, backing off, rather than at once.
        delay = retry_delay(retry)
        api_error = error if isinstance(error, ApiException) else ApiException(reason=str(error))
        outcome = api_failure(dict(body), api_error, delay)
        with contextlib.suppress(ApiException, urllib3.exceptions.HTTPError):
            memo.kube.update_status(
                GROKDEPLOYMENT,
                meta["namespace"],
                meta["name"],
                lambda stored: outcome.status(stored.get("status")),
            )
        raise kopf.TemporaryError(outcome.conditions[0].message, delay=delay) from error
    # Written from the object as stored when the pass ends, not from kopf's body: the autoscaler
    # may have set its ScalingActive condition in the same conditions list meanwhile.
    memo.kube.update_status(
        GROKDEPLOYMENT,
        meta["namespace"],
        meta["name"],
        lambda stored: outcome.status(stored.get("status")),
    )


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
def on_change(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    _reconcile(body, memo, retry)


@kopf.timer(*RESOURCE, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, memo: kopf.Memo, retry: int = 0, **_: Any) -> None:
    _reconcile(body, memo, retry)


def mirror_rayservice(kube: Kube, gate: PeeringGate | None, rayservice: dict[str, Any]) -> bool:
    """KubeRay wrote a RayService's status: mirror it into its owner's status right away rather
    than at the next resync (observe only: re-applying here would feed back events). Only the
    active peer writes, as kopf lets only it reconcile. Returns whether it was this one's to do."""
    if gate is not None and not gate.active():
        return False
    meta = rayservice["metadata"]
    owner_name = (meta.get("labels") or {}).get(DEPLOYMENT_LABEL)
    if not owner_name:
        return False
    controllers = {r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")}

    def observed_status(owner: dict[str, Any]) -> dict[str, Any] | None:
        # Only the RayService this GrokDeployment controls speaks for it, not a look-alike.
        if owner["metadata"].get("uid") not in controllers or not observable(owner):
            return None
        return _timed(lambda: observe(owner, rayservice), owner).status(owner.get("status"))

    kube.update_status(GROKDEPLOYMENT, meta["namespace"], owner_name, observed_status)
    return True


@kopf.on.cleanup()
def stop_watches(memo: kopf.Memo, **_: Any) -> None:
    for watch in getattr(memo, "rayservice_watches", []):
        watch.stop()


@kopf.on.delete(*RESOURCE, optional=True)
def on_delete(meta: kopf.Meta, **_: Any) -> None:
    # Children carry ownerReferences: the garbage collector deletes them with their owner.
    metrics.forget(meta["namespace"], meta["name"])


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: the service account. Elsewhere: $KUBECONFIG as it is now (kopf's default login
    # goes through the kubernetes client, which read $KUBECONFIG when it was imported).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


# The built-in autoscaler: a daemon per GrokDeployment with spec.autoscaling.enabled (issue 7).
register_autoscaler(kopf.get_default_registry())
