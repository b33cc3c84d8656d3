"""The autoscaler inside the complete operator (`grokserve.operator.handlers` in kopf) against the
KMock API server: a queue in a real Prometheus drives spec.replicas through /scale, and the reconcile
handler carries the new size into the RayService."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.autoscaling import QueueExporter
from testkit.operator_env import (
    GROKDEPLOYMENTS,
    clusterrole_grants,
    kube,
    operator_requests,
    refusing,
    running_operator,
    wait_until,
)
from testkit.prometheus import PrometheusServer, TestExporter

__all__ = ["kube"]  # the fixture, re-exported for pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EXAMPLE = (
    Path(__file__).resolve().parents[2] / "manifests" / "examples" / "grok-1-int8-single-node.yaml"
)
NS, NAME = "llm", "grok-1"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments/{NAME}"
RS = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}"
EVALUATION_S = 5


def worker_replicas(rayservice: dict[str, Any] | None) -> int | None:
    if not rayservice:
        return None
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group["replicas"]


def condition_types(body: dict[str, Any] | None) -> set[str]:
    return {c["type"] for c in ((body or {}).get("status") or {}).get("conditions", [])}


def scaling_active(body: dict[str, Any] | None) -> dict[str, Any]:
    conditions = ((body or {}).get("status") or {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "ScalingActive"), {})


FORBIDDEN = (
    'User "system:serviceaccount:grokserve-system:grokserve-operator" cannot patch resource '
    '"grokdeployments/scale" in API group "grokserve.io"'
)


refuse_scale = refusing("PATCH", "grokdeployments", 403, FORBIDDEN, subresource="scale")


def test_queue_scales_the_rayservice_through_the_whole_operator(
    kube: Any, exporter: TestExporter, prometheus: PrometheusServer
) -> None:
    server, api = kube
    api.install_crds(kuberay=True)
    queue = QueueExporter(exporter, (NAME,))
    prometheus.wait_for_targets_up(timeout_s=20)
    body = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    body["spec"]["autoscaling"].update(
        prometheusUrl=prometheus.url, evaluationIntervalSeconds=EVALUATION_S, maxReplicas=3
    )
    with running_operator():
        api.create(f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments", body)
        assert wait_until(lambda: worker_replicas(api.get(RS)), what="the RayService") == 1
        wait_until(
            lambda: (api.get(GD).get("status") or {}).get("autoscaling"), what="a first evaluation"
        )

        # 20 waiting at a target of 8 → ceil(20 / 8) = 3 replicas, through /scale ...
        queue.set(NAME, waiting=20, running=8)
        # ... which the API server first refuses (as it would without RBAC for /scale): the
        # status says so instead of claiming a valid metric, and the size stays.
        server.call(lambda kube_api: kube_api.admission.append(refuse_scale))
        refused = wait_until(
            lambda: (
                scaling_active(api.get(GD)).get("reason") == "ScaleFailed"
                and scaling_active(api.get(GD))
            ),
            timeout=EVALUATION_S + 3,
            what="ScalingActive ScaleFailed",
        )
        assert refused["status"] == "False"
        assert refused["observedGeneration"] == api.get(GD)["metadata"]["generation"]
        assert FORBIDDEN in refused["message"] and "HTTP 403" in refused["message"]
        assert api.get(GD)["spec"]["replicas"] == 1

        # Allowed again: the next evaluation scales, then the reconcile handler (on the spec
        # change) resizes the RayService's worker group.
        server.call(lambda kube_api: kube_api.admission.remove(refuse_scale))
        wait_until(lambda: api.get(GD)["spec"]["replicas"] == 3, timeout=15, what="spec.replicas 3")
        wait_until(
            lambda: worker_replicas(api.get(RS)) == 3, timeout=15, what="3 RayService workers"
        )
        # Both writers' conditions end up side by side in the status, ScalingActive valid again.
        wait_until(
            lambda: (
                "Ready" in condition_types(api.get(GD))
                and scaling_active(api.get(GD)).get("reason") == "ValidMetric"
            ),
            timeout=EVALUATION_S + 3,
            what="Ready and ScalingActive ValidMetric",
        )
    # Every request the operator made while it scaled, the /scale write included, is granted by
    # the ClusterRole it runs under (test_operator_rbac.py checks the rest of the role).
    assert server.call(operator_requests) - clusterrole_grants() == set()
