"""Every kind of GrokDeployment change, through KubeRay's own "does this reach the cluster?" rule.

The rule (KubeRay's cluster hash, which leaves out the worker groups' replica fields) is ported in
`testkit/kuberay_rules.py`. A change is lost when the cluster KubeRay leaves running cannot hold
what the new spec asks for; these tests show that none is, and what each kind costs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from grokserve.operator.builders import Owner, build_rayservice, worker_nodes
from grokserve.operator.spec import parse_spec
from testkit.kuberay_rules import apply_change, cluster_hash

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests/examples/grok-1-int8-single-node.yaml"
OWNER = Owner(name="grok-1", namespace="llm", uid="u-1")


def base_spec() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())["spec"]  # autoscaling 1..4, 8 GPUs per replica


def rendered(spec: dict[str, Any]) -> dict[str, Any]:
    return build_rayservice(OWNER, parse_spec(spec))["spec"]


def changed(path: str, value: Any, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    result = copy.deepcopy(spec or base_spec())
    *parents, leaf = path.split(".")
    node = result
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return result


def serve_application(rayservice_spec: dict[str, Any]) -> dict[str, Any]:
    (app,) = yaml.safe_load(rayservice_spec["serveConfigV2"])["applications"]
    return app


def serve_replicas(rayservice_spec: dict[str, Any]) -> int:
    """The GrokReplica count Serve deploys: its deployment option (else the args' count); with
    autoscaling bounds (at zero), the count it starts with, which Serve's schema must accept."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(rayservice_spec["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    options = {d["name"]: d for d in app.get("deployments", [])}.get("GrokReplica", {})
    if options.get("num_replicas") == "auto":
        bounds = options["autoscaling_config"]
        # The count Serve sets (initial, within the bounds); none at zero.
        assert bounds["min_replicas"] <= bounds["initial_replicas"] <= bounds["max_replicas"]
        return bounds["initial_replicas"]
    return options.get("num_replicas", app["args"]["replicas"])


def code_version(rayservice_spec: dict[str, Any]) -> str:
    """Serve's code version of the application (Ray's own function): when it changes, Serve
    restarts every replica of the application."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    return get_app_code_version(ServeApplicationSchema(**serve_application(rayservice_spec)))


def test_the_port_agrees_with_kuberays_own_diff_replicas_case() -> None:
    # KubeRay's util_test "diff replicas": equal hashes; any other field: different hashes.
    cluster = rendered(base_spec())["rayClusterConfig"]
    scaled = copy.deepcopy(cluster)
    group = scaled["workerGroupSpecs"][0]
    group.update(replicas=7, minReplicas=3, maxReplicas=9, scaleStrategy={"workersToDelete": ["p"]})
    assert cluster_hash(scaled) == cluster_hash(cluster)
    group["rayStartParams"] = {"num-gpus": "4"}
    assert cluster_hash(scaled) != cluster_hash(cluster)


# (what changes, KubeRay's effect on the running cluster). A new cluster holds its own worker
# nodes until it serves: twice the GPUs for a while.
TO_ZERO = {"autoscaling.minReplicas": 0, "autoscaling.scaleToZeroIdleSeconds": 600}
CHANGES = [
    ({"replicas": 4}, "unchanged"),
    ({**TO_ZERO, "replicas": 0}, "unchanged"),
    ({"autoscaling.maxReplicas": 8}, "unchanged"),
    (TO_ZERO, "unchanged"),
    ({"autoscaling.enabled": False, "replicas": 9}, "unchanged"),
    ({"serving.maxBatchSize": 32}, "unchanged"),
    ({"serving.maxSequenceLength": 4096}, "unchanged"),
    ({"model.dtype": "float32"}, "unchanged"),
    ({"model.source": "pvc://grok-weights/ckpt-1"}, "unchanged"),
    ({"parallelism.nodesPerReplica": 2}, "unchanged"),
    ({"parallelism.tensor": 4}, "unchanged"),
    ({"parallelism.strategy": "spread"}, "unchanged"),
    ({"parallelism.gpuMemory": "141Gi"}, "unchanged"),
    ({"ray.upgradeStrategy": "None"}, "unchanged"),
    ({"model.source": "pvc://other-claim/ckpt-0"}, "new-cluster"),
    (
        {"parallelism.gpusPerNode": 4, "parallelism.tensor": 4, "parallelism.expert": 4},
        "new-cluster",
    ),
    ({"ray.image": "ghcr.io/grokserve/grokserve-serving:0.2.0"}, "new-cluster"),
    ({"ray.rayVersion": "2.61.0"}, "new-cluster"),
    ({"ray.workerResources": {"cpu": "96", "memory": "1200Gi"}}, "new-cluster"),
    ({"ray.headResources": {"cpu": "8", "memory": "32Gi"}}, "new-cluster"),
    ({"ray.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}}, "new-cluster"),
    ({"ray.tolerations": []}, "new-cluster"),
    ({"ray.serviceAccountName": "weights-reader"}, "new-cluster"),
    ({"ray.gpuResourceName": "amd.com/gpu"}, "new-cluster"),
    ({"ray.idleTimeoutSeconds": 600}, "new-cluster"),
    (
        {"ray.image": "ghcr.io/grokserve/grokserve-serving:0.2.0", "ray.upgradeStrategy": "None"},
        "ignored",
    ),
]


@pytest.mark.parametrize(("changes", "effect"), CHANGES, ids=lambda v: str(v))
def test_every_change_reaches_the_cluster_that_runs_after_it(
    changes: dict[str, Any], effect: str
) -> None:
    after = base_spec()
    for path, value in changes.items():
        after = changed(path, value, after)
    before, goal = rendered(base_spec()), rendered(after)
    outcome = apply_change(before, goal)
    assert outcome.cluster == effect
    if effect != "ignored":
        # What KubeRay leaves running is what the new spec renders, but for the fields its hash
        # mutes.
        assert cluster_hash(outcome.running_cluster) == cluster_hash(goal["rayClusterConfig"])
    # Of those, the bounds let Ray's autoscaler give the new spec its nodes, whatever it asks.
    (group,) = outcome.running_cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= worker_nodes(parse_spec(after)) <= group["maxReplicas"]
    # The Serve config (replica count included) reaches the cluster that serves.
    serve_changed = goal["serveConfigV2"] != before["serveConfigV2"]
    assert outcome.serve_config_submitted == (serve_changed or effect == "new-cluster")


def test_autoscaled_example_runs_1_to_4_replicas_without_a_cluster_change() -> None:
    # The "done when": min 1, max 4; every /scale step is an in-place Serve update that
    # asks for the replica count, and the cluster KubeRay made first lets Ray's autoscaler add
    # (and later remove) the nodes: no change KubeRay's hash would ignore is needed.
    spec = base_spec()
    for path, value in TO_ZERO.items():
        spec = changed(path, value, spec)
    first = rendered(spec)
    running = first
    for replicas in (2, 3, 4, 3, 1, 0, 1):
        goal = rendered(changed("replicas", replicas, spec))
        outcome = apply_change(running, goal)
        assert outcome.cluster == "unchanged" and outcome.serve_config_submitted
        assert serve_replicas(goal) == replicas
        # ... which Serve applies without restarting the replicas that already serve.
        assert code_version(goal) == code_version(first)
        (group,) = outcome.running_cluster["workerGroupSpecs"]
        assert group["minReplicas"] <= replicas <= group["maxReplicas"]
        running = {**goal, "rayClusterConfig": outcome.running_cluster}
    assert running["rayClusterConfig"] == first["rayClusterConfig"]


def test_scale_to_zero_asks_serve_for_no_replica() -> None:
    spec = changed("replicas", 0, changed("autoscaling.minReplicas", 0))
    spec["autoscaling"]["scaleToZeroIdleSeconds"] = 600
    goal = rendered(spec)
    # No replica means no placement group, so Ray's autoscaler finds every worker idle.
    assert serve_replicas(goal) == 0
    # Only the model deployment: the API ingress and MetricsHub keep their one replica each
    # (a target capacity would scale them to none too, and the endpoint would not answer).
    config = yaml.safe_load(goal["serveConfigV2"])
    assert "target_capacity" not in config
    (app,) = config["applications"]
    assert [d["name"] for d in app["deployments"]] == ["GrokReplica"]
    bounds = app["deployments"][0]["autoscaling_config"]
    assert (bounds["min_replicas"], bounds["max_replicas"]) == (0, 1)
    assert goal["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert goal["rayClusterConfig"]["autoscalerOptions"] == {"idleTimeoutSeconds": 60}


def test_a_serving_change_restarts_the_replicas_on_the_same_cluster() -> None:
    before = rendered(base_spec())
    after = rendered(changed("serving.maxBatchSize", 32))
    assert apply_change(before, after).cluster == "unchanged"
    # New args, new code version: Serve replaces every replica in place (weights reloaded, no
    # extra GPUs), unlike a replica-count change.
    assert code_version(after) != code_version(before)
