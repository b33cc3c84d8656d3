"""A GrokDeployment's status, computed from its RayService's status (pure functions).

`Ready` means: the RayService has seen the current generation of its spec, the Serve application is
RUNNING with every deployment HEALTHY, and as many worker nodes are ready as the spec asks for.
`readyReplicas` counts what serves now, also while a newer spec is being applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from grokserve.model.placement import Plan
from grokserve.operator.builders import (
    Owner,
    endpoint,
    placement_summary,
    selector,
    worker_nodes,
)
from grokserve.operator.kuberay import ready_worker_nodes, refusal, too_old
from grokserve.operator.spec import GrokDeploymentSpec

KUBERAY_INSTALL_HINT = (
    "install KubeRay's operator first: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ "
    "&& helm install kuberay-operator kuberay/kuberay-operator"
)


# The status fields that describe a valid spec (absent from a failed deployment's status).
SPEC_FIELDS = ("replicas", "replicaSummary", "desiredReplicas", "gpus", "endpoint", "placement")

# Ready reasons under which replicas may be loading their weights: the Serve application is not
# deployed or not yet healthy. Loading replaces them while progress is known.
LOADING = "Loading"
LOADING_REASONS = frozenset(
    {"ServeApplicationPending", "ServeApplicationDeploying", "WaitingForNodes", LOADING}
)


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str

    def as_dict(self, generation: int | None, now: str) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": generation,
            "lastTransitionTime": now,
        }


@dataclass(frozen=True)
class LoadingProgress:
    """The weights of the replicas that are still loading, summed over them and their shards:
    bytes on their nodes (found in the node cache or fetched), bytes they need, and the rate at
    which bytes arrive from the store (None until Prometheus has two samples to derive it)."""

    bytes_done: float
    bytes_needed: float
    bytes_per_second: float | None

    def as_status(self) -> dict[str, int | None]:
        rate = self.bytes_per_second
        return {
            "bytesDone": int(self.bytes_done),
            "bytesNeeded": int(self.bytes_needed),
            "bytesPerSecond": None if rate is None else round(rate),
        }

    @property
    def message(self) -> str:
        """e.g. "loading weights: 12.3 GiB of 300 GiB (4%) at 850 MiB/s"."""
        done, needed = self.bytes_done, self.bytes_needed
        # Floored: 100% only once every byte is there.
        percent = int(100 * done // needed) if needed else 100
        text = f"loading weights: {binary_bytes(done)} of {binary_bytes(needed)} ({percent}%)"
        if self.bytes_per_second is not None:
            text += f" at {binary_bytes(self.bytes_per_second)}/s"
        return text


def binary_bytes(count: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1, three digits or more:
    850 MiB, 12.3 GiB, 1.25 TiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value, unit = float(count), units[0]
    for unit in units:
        if value < 1024 or unit == units[-1]:
            break
        value /= 1024
    if unit == "B" or value >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"


def may_be_loading(conditions: list[Condition]) -> bool:
    """Whether replicas may be loading their weights, by the Ready condition."""
    ready = next(c for c in conditions if c.type == "Ready")
    return not ready.status and ready.reason in LOADING_REASONS


def loading_conditions(conditions: list[Condition], progress: LoadingProgress) -> list[Condition]:
    """`conditions` with Ready and Progressing saying how far the weights are, when replicas may
    be loading; a wait for nodes stays in the message."""
    if not may_be_loading(conditions):
        return conditions
    ready = next(c for c in conditions if c.type == "Ready")
    message = progress.message
    if ready.reason == "WaitingForNodes":
        message += f"; {ready.message}"
    return [
        Condition(c.type, c.status, LOADING, message) if c.type in ("Ready", "Progressing") else c
        for c in conditions
    ]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: list[dict[str, Any]] | None,
    current: list[Condition],
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """Conditions as Kubernetes expects them: lastTransitionTime moves only when status changes."""
    before = {c.get("type"): c for c in previous or []}
    merged = []
    for condition in current:
        entry = condition.as_dict(generation, now)
        old = before.get(condition.type)
        if (
            old is not None
            and old.get("status") == entry["status"]
            and old.get("lastTransitionTime")
        ):
            entry["lastTransitionTime"] = old["lastTransitionTime"]
        merged.append(entry)
    # Conditions other writers own (the autoscaler's ScalingActive) survive: the list is written
    # whole.
    ours = {condition.type for condition in current}
    merged.extend(c for c in previous or [] if c.get("type") not in ours)
    return merged


def _unhealthy_deployments(application: dict[str, Any]) -> list[str]:
    deployments = application.get("serveDeploymentStatuses") or {}
    return sorted(
        f"{name} {info.get('status', 'UNKNOWN')}"
        + (f" ({info['message']})" if info.get("message") else "")
        for name, info in deployments.items()
        if info.get("status") != "HEALTHY"
    )


def observed_replicas(spec: GrokDeploymentSpec, rayservice: dict[str, Any] | None) -> int:
    """Replicas whose worker nodes exist in the serving cluster (ready or not): status.replicas,
    what /scale reports as the current size."""
    status = (rayservice or {}).get("status") or {}
    cluster = (status.get("activeServiceStatus") or {}).get("rayClusterStatus") or {}
    workers = max(
        int(cluster.get("availableWorkerReplicas") or 0),
        int(cluster.get("readyWorkerReplicas") or 0),
    )
    return workers // spec.parallelism.nodes_per_replica


def _serving_replicas(
    spec: GrokDeploymentSpec, rayservice: dict[str, Any], application: dict[str, Any] | None
) -> int:
    """Replicas serving now: the application runs healthy, counted by their ready worker nodes."""
    if application is None or application.get("status") != "RUNNING":
        return 0
    if _unhealthy_deployments(application):
        return 0
    ready_nodes = ready_worker_nodes(rayservice)
    return min(ready_nodes // spec.parallelism.nodes_per_replica, spec.replicas)


def _missing_nodes(spec: GrokDeploymentSpec, rayservice: dict[str, Any]) -> str | None:
    """Why replicas wait, when fewer worker nodes are ready than the replicas need.

    Ray's autoscaler asks KubeRay for a worker pod per node a pending replica needs; until the
    Kubernetes cluster has room for those pods (GPU nodes), the replicas wait.
    """
    needed, ready = worker_nodes(spec), ready_worker_nodes(rayservice)
    if ready >= needed:
        return None
    kind = "GPU" if spec.parallelism.device == "gpu" else "CPU worker"
    return f"waiting for {needed - ready} {kind} node(s): {ready} of {needed} worker nodes ready"


def serving_conditions(
    owner: Owner,
    spec: GrokDeploymentSpec,
    rayservice: dict[str, Any] | None,
) -> tuple[list[Condition], int]:
    """(Ready, Progressing, Degraded) and the number of replicas that serve now."""
    if rayservice is None:
        return _waiting("RayServiceMissing", "the RayService has not been created yet"), 0
    outdated = too_old(rayservice)
    if outdated is not None:
        return failure_conditions("KubeRayTooOld", outdated), 0
    status = rayservice.get("status") or {}
    active = status.get("activeServiceStatus") or {}
    application = (active.get("applicationStatuses") or {}).get(owner.name)
    ready_replicas = _serving_replicas(spec, rayservice, application)
    refused = refusal(rayservice)
    if refused is not None:
        # KubeRay will not act on this RayService; whatever serves keeps serving the older spec.
        reason, detail = refused
        return failure_conditions(reason, f"KubeRay: {detail}"), ready_replicas
    if spec.replicas == 0:
        message = (
            "scaled to zero: no model replica runs; the endpoint still answers (503 "
            "scaled_to_zero with Retry-After) and counts those requests as waiting, which wakes "
            "the deployment where the autoscaler is enabled"
        )
        lingering = ready_worker_nodes(rayservice)
        if lingering:
            message += (
                f"; {lingering} worker node(s) go once idle for {spec.ray.idle_timeout_seconds}s"
            )
        return [
            Condition("Ready", False, "ScaledToZero", message),
            Condition("Progressing", False, "ScaledToZero", message),
            Condition("Degraded", False, "ScaledToZero", message),
        ], 0
    generation = (rayservice.get("metadata") or {}).get("generation")
    if status.get("observedGeneration") is None:
        # Not "the previous spec serves meanwhile": nothing has reported on it at all.
        message = (
            "KubeRay has not reported on the RayService yet; if this lasts, check that KubeRay's "
            "operator is running"
        )
        return _waiting("RayServicePending", message), 0
    if generation is not None and status.get("observedGeneration") != generation:
        message = (
            f"KubeRay has not applied the latest spec yet; {ready_replicas} replica(s) of the "
            "previous spec serve meanwhile"
        )
        return _waiting("RayServiceUpdating", message), ready_replicas
    if application is None:
        return _waiting("ServeApplicationPending", "the Serve application is not deployed yet"), 0
    app_status = application.get("status", "UNKNOWN")
    unhealthy = _unhealthy_deployments(application)
    if app_status in ("DEPLOY_FAILED", "UNHEALTHY"):
        detail = application.get("message") or "; ".join(unhealthy) or app_status
        return [
            Condition("Ready", False, "ServeApplicationFailed", f"{app_status}: {detail}"),
            Condition("Progressing", False, "ServeApplicationFailed", detail),
            Condition("Degraded", True, "ServeApplicationFailed", detail),
        ], 0
    missing = _missing_nodes(spec, rayservice)
    if app_status != "RUNNING" or unhealthy:
        if missing is not None:
            return _waiting("WaitingForNodes", missing), 0
        detail = "; ".join(unhealthy) or f"application {app_status}"
        return _waiting("ServeApplicationDeploying", detail), 0
    pending = status.get("pendingServiceStatus") or {}
    upgrading = bool(pending.get("rayClusterName"))
    if missing is not None:
        # The application runs with the replicas whose nodes are ready; the rest wait for theirs.
        return _waiting("WaitingForNodes", missing), ready_replicas
    message = f"{spec.replicas} replica(s) serving at {endpoint(owner)}"
    progressing = (
        Condition("Progressing", True, "ClusterUpgrading", "KubeRay is preparing a new Ray cluster")
        if upgrading
        else Condition("Progressing", False, "Serving", "the current spec is deployed")
    )
    return [
        Condition("Ready", True, "Serving", message),
        progressing,
        Condition("Degraded", False, "Serving", "every Serve deployment is healthy"),
    ], ready_replicas


def _waiting(reason: str, message: str) -> list[Condition]:
    return [
        Condition("Ready", False, reason, message),
        Condition("Progressing", True, reason, message),
        Condition("Degraded", False, reason, message),
    ]


def failure_conditions(reason: str, message: str) -> list[Condition]:
    """The deployment cannot proceed (invalid spec, KubeRay missing): not ready, nothing in flight."""
    return [
        Condition("Ready", False, reason, message),
        Condition("Progressing", False, reason, message),
        Condition("Degraded", True, reason, message),
    ]


def build_status(
    owner: Owner,
    spec: GrokDeploymentSpec | None,
    plan: Plan | None,
    conditions: list[Condition],
    ready_replicas: int,
    *,
    observed_replicas: int = 0,
    generation: int | None,
    previous: dict[str, Any] | None,
    now: str | None = None,
    loading: LoadingProgress | None = None,
) -> dict[str, Any]:
    """The status to write over `previous`; `spec` and `plan` are None when the deployment failed.

    A failure sets what a spec describes to null, which the status write deletes: an endpoint or a
    replica summary left from an earlier success would claim that something serves. So does
    `loading` None: progress shows only while replicas load.
    """
    previous = previous or {}
    stamp = now or now_rfc3339()
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "selector": selector(owner),
        "readyReplicas": ready_replicas,
        "conditions": merge_conditions(previous.get("conditions"), conditions, generation, stamp),
        "loading": None if loading is None else loading.as_status(),
    }
    if spec is None or plan is None:
        return {**status, **dict.fromkeys(SPEC_FIELDS)}
    return {
        **status,
        "replicas": observed_replicas,
        "replicaSummary": f"{ready_replicas}/{spec.replicas}",
        "desiredReplicas": spec.replicas,
        "gpus": spec.replicas * spec.parallelism.gpus_per_replica,
        "endpoint": endpoint(owner),
        "placement": placement_summary(spec, plan),
    }
