"""One reconcile pass: validate the spec, apply the children, compute the status.

Free of kopf so that it can be read and tested on its own; `handlers.py` wires it to kopf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grokserve.operator.builders import Owner, build_children
from grokserve.operator.kube import RAYSERVICE, SERVICEMONITOR, Kube
from grokserve.operator.spec import SpecError, parse_spec
from grokserve.operator.status import (
    KUBERAY_INSTALL_HINT,
    build_status,
    failure_conditions,
    serving_conditions,
)


@dataclass(frozen=True)
class Outcome:
    status: dict[str, Any]
    ready: bool
    ready_replicas: int
    desired_replicas: int | None
    # A Warning event worth posting (reason, message), when the deployment cannot proceed.
    warning: tuple[str, str] | None = None


def owner_of(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid"))


def reconcile(kube: Kube, body: dict[str, Any]) -> Outcome:
    owner = owner_of(body)
    generation = body["metadata"].get("generation")
    previous = body.get("status") or {}
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError as error:
        return _failed(owner, error.reason, error.message, generation, previous)
    if not kube.serves(RAYSERVICE):
        message = f"KubeRay's RayService CRD (ray.io/v1) is not installed; {KUBERAY_INSTALL_HINT}"
        return _failed(owner, "KubeRayMissing", message, generation, previous)
    children = build_children(owner, spec, with_servicemonitor=kube.serves(SERVICEMONITOR))
    for child in children:
        kube.apply(child)
    rayservice = kube.get(RAYSERVICE, owner.namespace, owner.name)
    conditions, ready_replicas = serving_conditions(owner, spec, rayservice)
    status = build_status(
        owner, spec, conditions, ready_replicas, generation=generation, previous=previous
    )
    ready = any(c.type == "Ready" and c.status for c in conditions)
    return Outcome(status, ready, ready_replicas, spec.replicas)


def _failed(
    owner: Owner, reason: str, message: str, generation: int | None, previous: dict[str, Any]
) -> Outcome:
    conditions = failure_conditions(reason, message)
    status = build_status(owner, None, conditions, 0, generation=generation, previous=previous)
    before = next((c for c in previous.get("conditions", []) if c.get("type") == "Ready"), {})
    # Post the event once per distinct problem, not on every periodic pass.
    repeated = before.get("reason") == reason and before.get("message") == message
    return Outcome(status, False, 0, None, None if repeated else (reason, message))
