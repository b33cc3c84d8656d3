"""What KubeRay's RayService tells us, read from its stored object (pure functions).

KubeRay (ray-project/kuberay) owns the RayService's status; these helpers read the facts the
operator acts on: which Ray cluster serves, whether KubeRay refused the RayService, and whether
the installed KubeRay is recent enough for what the operator renders.
"""

from __future__ import annotations

from typing import Any

# Pod labels KubeRay sets: the RayCluster a pod belongs to, and whether its Serve proxy is healthy
# (the serve Service KubeRay manages selects both).
CLUSTER_LABEL = "ray.io/cluster"
SERVE_LABEL = "ray.io/serve"
# ... and its node type: head or worker.
NODE_TYPE_LABEL = "ray.io/node-type"

# `spec.upgradeStrategy` first appears in KubeRay 1.3's RayService CRD; an older CRD prunes it.
MIN_KUBERAY_VERSION = "1.3"
_NEWEST_FIELD = "upgradeStrategy"

# Ready reasons with which KubeRay refuses a RayService: it will not act on it until it changes.
# ValidationFailed leaves observedGeneration behind; InitializingTimeout is terminal (KubeRay
# deletes the clusters, and only a new RayService recovers).
VALIDATION_FAILED = "ValidationFailed"
INITIALIZING_TIMEOUT = "InitializingTimeout"


def _status(rayservice: dict[str, Any]) -> dict[str, Any]:
    return rayservice.get("status") or {}


def serving_cluster(rayservice: dict[str, Any] | None) -> str | None:
    """The RayCluster that KubeRay routes traffic to: the active one, else none yet.

    KubeRay points its serve Service at the pending cluster once that one is ready and, in the
    same status write, promotes it to active; so the active cluster is the one that serves.
    """
    if rayservice is None:
        return None
    return (_status(rayservice).get("activeServiceStatus") or {}).get("rayClusterName") or None


def ready_condition(rayservice: dict[str, Any]) -> dict[str, Any]:
    conditions = _status(rayservice).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Ready"), {})


def refusal(rayservice: dict[str, Any]) -> tuple[str, str] | None:
    """(KubeRay's reason, message) when KubeRay refuses to act on the RayService as it is."""
    ready = ready_condition(rayservice)
    reason = ready.get("reason")
    if ready.get("status") != "False":
        return None
    if reason == INITIALIZING_TIMEOUT:
        return reason, ready.get("message") or reason
    generation = (rayservice.get("metadata") or {}).get("generation")
    # A ValidationFailed left from an earlier generation that KubeRay has since accepted is stale:
    # KubeRay only replaces a Ready=False condition once the application serves.
    if reason == VALIDATION_FAILED and _status(rayservice).get("observedGeneration") != generation:
        return reason, ready.get("message") or reason
    return None


def too_old(rayservice: dict[str, Any]) -> str | None:
    """Why the installed KubeRay is older than MIN_KUBERAY_VERSION, or None.

    The API server prunes fields its CRD does not know, so a RayService stored without the
    newest field the operator writes was stored by an older KubeRay's CRD.
    """
    if _NEWEST_FIELD in (rayservice.get("spec") or {}):
        return None
    return (
        f"the RayService was stored without spec.{_NEWEST_FIELD}: KubeRay's CRD is older than "
        f"{MIN_KUBERAY_VERSION}; upgrade KubeRay (helm upgrade kuberay-operator "
        f"kuberay/kuberay-operator --version {MIN_KUBERAY_VERSION}.0 or later, CRDs included)"
    )


def ready_worker_nodes(rayservice: dict[str, Any]) -> int:
    """Worker pods of the serving cluster that are ready, as KubeRay counts them."""
    active = _status(rayservice).get("activeServiceStatus") or {}
    cluster = active.get("rayClusterStatus") or {}
    return int(cluster.get("readyWorkerReplicas") or cluster.get("availableWorkerReplicas") or 0)
