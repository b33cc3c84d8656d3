"""The endpoint Service follows the Ray cluster KubeRay routes to, across a new-cluster upgrade."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testkit.operator_env import GROKDEPLOYMENTS, kube, running_operator, wait_until

__all__ = ["kube"]

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests/examples/grok-1-int8-single-node.yaml"
NS = "llm"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments/grok-1"
RS = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/grok-1"
SERVICE = f"/api/v1/namespaces/{NS}/services/grok-1"
# Well under the operator's 30 s resync: the switch must come from the RayService event.
SWITCH_S = 10


def kuberay_status(generation: int, active: str, pending: str | None = None) -> dict:
    """RayService status as KubeRay writes it: the active cluster serves, a pending one prepares."""
    serving = {
        "rayClusterName": active,
        "applicationStatuses": {
            "grok-1": {
                "status": "RUNNING",
                "serveDeploymentStatuses": {"GrokReplica": {"status": "HEALTHY"}},
            }
        },
        "rayClusterStatus": {"readyWorkerReplicas": 1},
    }
    return {
        "observedGeneration": generation,
        "activeServiceStatus": serving,
        # null: the merge patch removes a pending cluster that KubeRay has promoted
        "pendingServiceStatus": {"rayClusterName": pending} if pending else None,
    }


def pinned_cluster(api) -> str | None:
    service = api.get(SERVICE)
    return service and service["spec"]["selector"].get("ray.io/cluster")


def test_the_endpoint_switches_with_kuberay_from_the_old_cluster_to_the_new(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    with running_operator():
        api.create(GD.rsplit("/", 1)[0], yaml.safe_load(EXAMPLE.read_text()))
        rayservice = wait_until(lambda: api.get(RS), what="the RayService")
        # No cluster named yet: the endpoint selects no pod rather than any of this deployment's.
        service = wait_until(lambda: api.get(SERVICE), what="the Service")
        assert service["spec"]["selector"] == {
            "grokserve.io/deployment": "grok-1",
            "ray.io/serve": "true",
            "ray.io/cluster": "",
        }

        old = "grok-1-7xk2p"
        generation = rayservice["metadata"]["generation"]
        api.merge_patch(f"{RS}/status", {"status": kuberay_status(generation, old)})
        wait_until(lambda: pinned_cluster(api) == old, timeout=SWITCH_S, what="the first cluster")

        # A new image needs a new cluster: KubeRay prepares it while the old one serves.
        api.merge_patch(GD, {"spec": {"ray": {"image": "ghcr.io/grokserve/serving:0.2.0"}}})
        generation = wait_until(
            lambda: (
                (r := api.get(RS))["metadata"]["generation"] > generation
                and r["metadata"]["generation"]
            ),
            what="the new RayService generation",
        )
        new = "grok-1-q9v4m"
        api.merge_patch(f"{RS}/status", {"status": kuberay_status(generation, old, new)})
        progressing = wait_until(
            lambda: next(
                (
                    c
                    for c in (api.get(GD).get("status") or {}).get("conditions", [])
                    if c["type"] == "Progressing" and c["reason"] == "ClusterUpgrading"
                ),
                None,
            ),
            what="Progressing ClusterUpgrading",
        )
        assert progressing["status"] == "True"
        assert pinned_cluster(api) == old  # the not-yet-ready cluster takes no traffic

        # The new cluster serves: KubeRay promotes it, and the endpoint follows right away.
        api.merge_patch(f"{RS}/status", {"status": kuberay_status(generation, new)})
        wait_until(lambda: pinned_cluster(api) == new, timeout=SWITCH_S, what="the new cluster")
