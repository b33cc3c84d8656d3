"""One reconcile pass: validate the spec, apply the children, compute the status.

Free of kopf so that it can be read and tested on its own; `handlers.py` wires it to kopf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.rest import ApiException

from grokserve.model.placement import Plan
from grokserve.operator.builders import Owner, build_children
from grokserve.operator.kube import RAYSERVICE, SERVICEMONITOR, Kube, api_message
from grokserve.operator.kuberay import serving_cluster
from grokserve.operator.replica import replica_plan
from grokserve.operator.spec import GrokDeploymentSpec, SpecError, check_name, parse_spec
from grokserve.operator.status import (
    KUBERAY_INSTALL_HINT,
    Condition,
    LoadingProgress,
    build_status,
    failure_conditions,
    loading_conditions,
    may_be_loading,
    observed_replicas,
    serving_conditions,
)

# build_children's signature: (owner, spec, plan, *, with_servicemonitor) -> children
BuildChildren = Callable[..., list[dict[str, Any]]]
# (Prometheus URL, namespace, name) -> the weights still loading, None when unknown.
LoadingProbe = Callable[[str, str, str], LoadingProgress | None]


@dataclass(frozen=True)
class Outcome:
    owner: Owner
    spec: GrokDeploymentSpec | None  # None when the deployment cannot proceed
    plan: Plan | None  # one replica's plan; None when the deployment cannot proceed
    conditions: list[Condition]
    ready_replicas: int
    generation: int | None
    # A Warning event worth posting (reason, message), when the deployment cannot proceed.
    warning: tuple[str, str] | None = None
    # Replicas whose worker nodes exist (status.replicas), ready or not.
    observed_replicas: int = 0
    # How far the loading replicas' weights are (status.loading), when Prometheus says.
    loading: LoadingProgress | None = None
    # Replicas may be loading and Prometheus can tell: worth another look soon.
    watches_loading: bool = False

    @property
    def ready(self) -> bool:
        return any(c.type == "Ready" and c.status for c in self.conditions)

    @property
    def desired_replicas(self) -> int | None:
        return None if self.spec is None else self.spec.replicas

    def status(self, stored: dict[str, Any] | None) -> dict[str, Any]:
        """The status to write over `stored`, the status as stored when it is written: other
        writers' conditions and the transition times come from there, not from an older read."""
        return build_status(
            self.owner,
            self.spec,
            self.plan,
            self.conditions,
            self.ready_replicas,
            observed_replicas=self.observed_replicas,
            generation=self.generation,
            previous=stored,
            loading=self.loading,
        )


# HTTP status -> Ready reason, for the API server refusing a child (413: too large for it).
REFUSALS = {400: "ChildRejected", 403: "Forbidden", 413: "ChildRejected", 422: "ChildRejected"}
KUBERAY_MISSING = "KubeRayMissing"
CHILD_CONFLICT = "ChildConflict"
API_ERROR = "APIServerError"


def owner_of(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid"))


def reconcile(
    kube: Kube,
    body: dict[str, Any],
    build: BuildChildren = build_children,
    loading: LoadingProbe | None = None,
) -> Outcome:
    """Validate and plan, apply every child (server-side apply), then observe the RayService.

    A spec that is invalid or whose replica does not fit its GPUs changes no child, and nothing is
    written while any child's name is held by an object that is not ours. `build` turns the spec
    and plan into the children (the operator passes a memo of `build_children`). `loading` asks
    Prometheus how far the weights are, when replicas may be loading and
    spec.autoscaling.prometheusUrl is set.
    """
    owner = owner_of(body)
    try:
        check_name(owner.name)
        spec = parse_spec(body.get("spec"))
        plan = replica_plan(owner.name, spec)
    except SpecError as error:
        return _failed(body, error.reason, error.message)
    if not kube.serves(RAYSERVICE):
        message = f"KubeRay's RayService CRD (ray.io/v1) is not installed; {KUBERAY_INSTALL_HINT}"
        return _failed(body, KUBERAY_MISSING, message)
    applying: dict[str, Any] | None = None
    try:
        # The endpoint follows the cluster KubeRay routes to, as the RayService's status names it.
        rayservice = kube.get(RAYSERVICE, owner.namespace, owner.name)
        routed = serving_cluster(rayservice)
        children = build(
            owner,
            spec,
            plan,
            with_servicemonitor=kube.serves(SERVICEMONITOR),
            serving_cluster=routed,
        )
        held = [h for h in (kube.foreign_holder(c, owner.uid) for c in children) if h is not None]
        if held:
            message = (
                f"{'; '.join(held)} already exist(s) and is not ours: left untouched; delete or "
                "rename it, or give the GrokDeployment another name"
            )
            return _failed(body, CHILD_CONFLICT, message)
        for child in children:
            applying = child
            stored = kube.apply(child)
            if child["kind"] == "RayService":
                # As stored after the apply, status included: what KubeRay has reported on it.
                rayservice = stored
    except ApiException as error:
        # A refusal (validation, an admission webhook, missing RBAC, too large) will not change
        # by retrying: report it. Anything else (5xx, 409, 429) propagates: the handler reports it
        # and retries with backoff.
        if error.status not in REFUSALS:
            raise
        what = (
            "reading the children"
            if applying is None
            else (f"{applying['kind']} {applying['metadata']['name']}")
        )
        return _failed(body, REFUSALS[error.status], f"{what}: {api_message(error)}")
    return _observed(body, spec, plan, rayservice, loading)


def _observed(
    body: dict[str, Any],
    spec: GrokDeploymentSpec,
    plan: Plan,
    rayservice: dict[str, Any] | None,
    loading: LoadingProbe | None,
) -> Outcome:
    owner = owner_of(body)
    conditions, ready_replicas = serving_conditions(owner, spec, rayservice)
    url = spec.autoscaling.prometheus_url
    watches = url is not None and may_be_loading(conditions)
    progress = None
    if watches and url is not None and loading is not None:
        progress = loading(url, owner.namespace, owner.name)
        if progress is not None and progress.bytes_needed > 0:
            conditions = loading_conditions(conditions, progress)
        else:
            progress = None
    return Outcome(
        owner,
        spec,
        plan,
        conditions,
        ready_replicas,
        body["metadata"].get("generation"),
        observed_replicas=observed_replicas(spec, rayservice),
        loading=progress,
        watches_loading=watches,
    )


def api_failure(body: dict[str, Any], error: ApiException, retry_in_s: float) -> Outcome:
    """The pass failed on an error that may pass (5xx, 409, 429, no connection): say so, and when
    the operator tries again."""
    what = f"HTTP {error.status}: {api_message(error)}" if error.status else str(error)
    return _failed(
        body, API_ERROR, f"the API server failed a request ({what}); retrying in {retry_in_s:g} s"
    )


def _failed(body: dict[str, Any], reason: str, message: str) -> Outcome:
    previous = (body.get("status") or {}).get("conditions") or []
    before: dict[str, Any] = next((c for c in previous if c.get("type") == "Ready"), {})
    # Post the event once per distinct problem, not on every periodic pass.
    repeated = before.get("reason") == reason and before.get("message") == message
    return Outcome(
        owner_of(body),
        None,
        None,
        failure_conditions(reason, message),
        0,
        body["metadata"].get("generation"),
        None if repeated else (reason, message),
    )
