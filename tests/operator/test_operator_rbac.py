"""Least-privilege RBAC: every request the operator makes is granted, and nothing more is granted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testkit.operator_env import (
    GROKDEPLOYMENTS,
    SERVICEMONITOR_CRD,
    clusterrole_grants,
    kube,
    operator_requests,
    running_operator,
    wait_until,
)

__all__ = ["kube"]

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
NS = "llm"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments"
# Granted but not exercised here: kopf lists namespaces only when started with --namespace
# patterns; the autoscaler's /scale writes are checked by test_autoscaling_operator.py, which
# runs the operator while it scales (a Prometheus would make this test slow).
UNEXERCISED = {
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("grokserve.io", "grokdeployments/scale", "patch"),
}


def test_operator_requests_are_exactly_what_the_clusterrole_grants(kube) -> None:
    server, api = kube
    api.install_crds(kuberay=True)
    api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", SERVICEMONITOR_CRD)
    body = yaml.safe_load((REPO / "manifests/examples/grok-1-int8-single-node.yaml").read_text())
    invalid = {**body, "metadata": {"name": "broken", "namespace": NS}}
    invalid["spec"] = {**body["spec"], "parallelism": {**body["spec"]["parallelism"], "tensor": 3}}
    with running_operator():
        api.create(GD, body)
        api.create(GD, invalid)  # an Event is posted
        wait_until(
            lambda: api.get(
                f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/grok-1"
            ),
            what="the ServiceMonitor",
        )
        wait_until(lambda: api.get(f"/api/v1/namespaces/{NS}/events")["items"], what="an Event")
        api.merge_patch(
            f"/apis/ray.io/v1/namespaces/{NS}/rayservices/grok-1/status",
            {"status": {"observedGeneration": 1}},
        )
        api.merge_patch(f"{GD}/grok-1", {"spec": {"replicas": 2}})
        api.delete(f"{GD}/grok-1")
        wait_until(lambda: api.get(f"{GD}/grok-1") is None, what="deletion")
    used = server.call(operator_requests)
    grants = clusterrole_grants()
    assert used - grants == set(), "the operator needs permissions the ClusterRole lacks"
    assert grants - used - UNEXERCISED == set(), (
        "the ClusterRole grants more than the operator uses"
    )
