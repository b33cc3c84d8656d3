"""Least-privilege RBAC: every request the operator makes is granted, and nothing more is granted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testkit.operator_env import GROKDEPLOYMENTS, kube, running_operator, wait_until

__all__ = ["kube"]

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
NS = "llm"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments"
SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [{"name": "v1", "served": True, "storage": True}],
    },
}
# Granted but not exercised by a cluster-wide run: kopf lists namespaces only when started with
# --namespace patterns.
UNEXERCISED = {("", "namespaces", "list"), ("", "namespaces", "watch")}


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def verb_of(method: str, params: dict, named: bool) -> str:
    if method == "GET":
        return "get" if named else ("watch" if params.get("watch") in ("true", "1") else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


def operator_requests(api) -> set[tuple[str, str, str]]:
    used = set()
    for request in api:
        if request.resource is None or request.resource.plural is None:
            continue  # discovery (/api, /apis/...) is open to every authenticated user
        if request.headers.get("User-Agent", "").startswith("Python-urllib"):
            continue  # the test's own client
        resource = request.resource.plural + (
            f"/{request.subresource}" if request.subresource else ""
        )
        verb = verb_of(request.method.value.upper(), request.params, request.name is not None)
        used.add((request.resource.group, resource, verb))
    return used


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
    role = yaml.safe_load((REPO / "manifests/rbac/clusterrole.yaml").read_text())
    grants = granted(role["rules"])
    assert used - grants == set(), "the operator needs permissions the ClusterRole lacks"
    assert grants - used - UNEXERCISED == set(), (
        "the ClusterRole grants more than the operator uses"
    )
