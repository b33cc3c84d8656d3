"""kopf handlers: reconcile GrokDeployments on create, update, resume and periodically.

Run with `grokserve operator` (or `kopf run -m grokserve.operator.handlers`). Every pass is
idempotent: children have fixed names and are created or updated in place, so a restarted operator
adopts what it made before instead of duplicating it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client, config

from grokserve.operator import metrics
from grokserve.operator.autoscaling.timer import register as register_autoscaler
from grokserve.operator.builders import DEPLOYMENT_LABEL
from grokserve.operator.kube import GROKDEPLOYMENT, Kube
from grokserve.operator.reconcile import (
    Outcome,
    follow_serving_cluster,
    observable,
    observe,
    reconcile,
)
from grokserve.operator.spec import API_GROUP, API_VERSION, PLURAL

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
# Periodic passes repair deleted children, notice KubeRay being installed later, and refresh the
# status from the RayService's (KubeRay updates it without touching our object).
RESYNC_SECONDS = float(os.environ.get("GROKSERVE_RESYNC_SECONDS", "30"))


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


def _reconcile(body: kopf.Body, memo: kopf.Memo) -> None:
    meta = body["metadata"]
    outcome = _timed(lambda: reconcile(memo.kube, dict(body)), body)
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
def on_change(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.timer(*RESOURCE, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.on.event(
    "ray.io", "v1", "rayservices", labels={"app.kubernetes.io/managed-by": "grokserve-operator"}
)
def on_rayservice_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # KubeRay writes the RayService's status; mirror it into the owner's status right away
    # rather than at the next resync, and move the endpoint when KubeRay switches clusters
    # (only the Service: re-applying the RayService here would feed back events).
    if event.get("type") not in ("ADDED", "MODIFIED") or not hasattr(memo, "kube"):
        return
    namespace = body["metadata"]["namespace"]
    owner_name = (body["metadata"].get("labels") or {}).get(DEPLOYMENT_LABEL)
    if not owner_name:
        return
    rayservice = dict(body)
    owner = memo.kube.get(GROKDEPLOYMENT, namespace, owner_name)
    if owner is not None and observable(owner):
        follow_serving_cluster(memo.kube, owner, rayservice)

    def observed_status(owner: dict[str, Any]) -> dict[str, Any] | None:
        if not observable(owner):
            return None
        return _timed(lambda: observe(owner, rayservice), owner).status(owner.get("status"))

    memo.kube.update_status(GROKDEPLOYMENT, namespace, owner_name, observed_status)


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
