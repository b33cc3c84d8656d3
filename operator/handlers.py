"""kopf handlers: reconcile GrokDeployments on create, update, resume and periodically.

Run with `grokserve operator` (or `kopf run -m grokserve.operator.handlers`). Every pass is
idempotent: children have fixed names and are created or merge-patched, so a restarted operator
adopts what it made before instead of duplicating it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import kopf
from kubernetes import client, config

from grokserve.operator import metrics
from grokserve.operator.autoscaling.timer import register as register_autoscaler
from grokserve.operator.kube import Kube
from grokserve.operator.reconcile import reconcile
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
    settings.posting.level = 30  # logging.WARNING: only problems become Events
    memo.kube = Kube(_api_client())


def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any) -> None:
    started = time.perf_counter()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        outcome = reconcile(memo.kube, dict(body))
    except Exception:
        metrics.RECONCILE_SECONDS.labels("error").observe(time.perf_counter() - started)
        raise
    metrics.RECONCILE_SECONDS.labels("ok").observe(time.perf_counter() - started)
    metrics.record(namespace, name, outcome.desired_replicas, outcome.ready_replicas, outcome.ready)
    patch.status.update(outcome.status)
    if outcome.warning is not None:
        reason, message = outcome.warning
        kopf.warn(dict(body), reason=reason, message=message)
        logger.warning(f"{reason}: {message}")


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
def on_change(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    _reconcile(body, patch, memo, logger)


@kopf.timer(*RESOURCE, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    _reconcile(body, patch, memo, logger)


@kopf.on.delete(*RESOURCE, optional=True)
def on_delete(meta: kopf.Meta, **_: Any) -> None:
    # Children carry ownerReferences: the garbage collector deletes them with their owner.
    metrics.forget(meta["namespace"], meta["name"])


# The built-in autoscaler: a daemon per GrokDeployment with spec.autoscaling.enabled (issue 7).
register_autoscaler(kopf.get_default_registry())
