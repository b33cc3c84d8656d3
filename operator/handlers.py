"""kopf handlers: watch GrokDeployments and their children, and reconcile on change.

Run with `grokserve operator` (or `kopf run -m grokserve.operator.handlers`). kopf's watch of
GrokDeployments and the operator's own watches of their children (`child_watch.py`) feed its cache
and its reconcile queue (`controller.py`): a GrokDeployment is reconciled when
it changes, when one of its children changes (KubeRay writing the RayService's status, a child
deleted or edited by someone else), and once per resync period, which makes no request when
nothing differs. Every pass is idempotent: children have fixed names and are applied in place, so a
restarted operator finds what it made before instead of duplicating it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from kubernetes import client, config

from grokserve.operator.autoscaling.daemon import register as register_autoscaler
from grokserve.operator.cache import CachedKube, ObjectCache
from grokserve.operator.controller import Controller
from grokserve.operator.spec import API_GROUP, API_VERSION, PLURAL

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
# The resync repairs what no event announces (KubeRay installed later, a write lost to an
# operator restart); events carry everything else, so it can be rare.
RESYNC_SECONDS = float(os.environ.get("GROKSERVE_RESYNC_SECONDS", "300"))
# Passes that run at once (threads: the kubernetes client is synchronous). Mostly waiting for
# the API server, so more than the cores; the client's connection pool is sized to match.
RECONCILE_WORKERS = int(os.environ.get("GROKSERVE_RECONCILE_WORKERS", "8"))
# Connections beyond the workers' own: the children's watches (one each per kind and namespace)
# and the autoscaler daemons' writes.
SPARE_CONNECTIONS = 8


def _api_client() -> client.ApiClient:
    # The kubernetes client reads $KUBECONFIG only when it is imported; pass it explicitly.
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    configuration.connection_pool_maxsize = RECONCILE_WORKERS + SPARE_CONNECTIONS
    return client.ApiClient(configuration)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # only problems become Events
    # kopf logs every watch event's handler at INFO: thousands of lines that say nothing. What a
    # pass wrote, and why one failed, is logged by the operator itself.
    logging.getLogger("kopf.objects").addFilter(_not_event_handler_success)
    memo.kube = CachedKube(_api_client(), ObjectCache())
    # `grokserve operator` passes its namespaces (else all) and its peering (name, identity,
    # priority; else standalone) in the memo.
    memo.controller = Controller(
        memo.kube,
        RECONCILE_WORKERS,
        RESYNC_SECONDS,
        namespaces=getattr(memo, "namespaces", None),
        peering=getattr(memo, "peering", None),
    )
    await memo.controller.start()


def _not_event_handler_success(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Handler 'on_grokdeployment' succeeded."


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if hasattr(memo, "controller"):
        await memo.controller.stop()


@kopf.on.event(*RESOURCE)
async def on_grokdeployment(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.grokdeployment_event(event)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: the service account. Elsewhere: $KUBECONFIG as it is now (kopf's default login
    # goes through the kubernetes client, which read $KUBECONFIG when it was imported).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


# The built-in autoscaler: a daemon per GrokDeployment with spec.autoscaling.enabled (issue 7).
register_autoscaler(kopf.get_default_registry())
