"""Scaling through the Serve config reaches the nodes: Ray's autoscaler adds and removes them.

The operator renders a GrokDeployment at 1, 2, 0 and 1 replicas; each serveConfigV2 goes to Serve
the way KubeRay submits it (Serve's config schema, `deploy_apps`) on a cluster whose autoscaling
config Ray derives from the rendered RayCluster (testkit/autoscaling_cluster.py): a replica added
by a scale-up gets a new (fake GPU) node and serves, without restarting the one that served, and
the nodes go once idle after a scale-down, to none at zero, where the API still answers (503
`scaled_to_zero`) from the same ingress replica, never restarted by a change of the count.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import pytest
import ray
import yaml
from ray import serve

from grokserve.operator.builders import Owner, build_rayservice
from grokserve.operator.spec import parse_spec
from grokserve.serving.config import REPLICA_DEPLOYMENT
from testkit.autoscaling_cluster import SIMULATED_GPU, FakeGPUCluster
from testkit.operator_env import wait_until
from testkit.serving import LIMITS, MODEL, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OWNER = Owner(name="grok-1", namespace="llm")
IDLE_TIMEOUT_S = 2
T = TypeVar("T")


def grok_deployment(replicas: int) -> dict[str, Any]:
    """One GPU per replica, as rendered for a cluster; a tiny model so that nodes start fast."""
    return {
        "model": {"preset": MODEL, "dtype": "float32"},
        "parallelism": {"device": "gpu", "gpusPerNode": 1, "nodesPerReplica": 1},
        "replicas": replicas,
        "serving": LIMITS,
        "ray": {
            "headResources": {"cpu": "1", "memory": "2Gi"},
            "workerResources": {"cpu": "2", "memory": "4Gi"},
            "idleTimeoutSeconds": IDLE_TIMEOUT_S,
        },
    }


def rendered(replicas: int) -> dict[str, Any]:
    return build_rayservice(OWNER, parse_spec(grok_deployment(replicas)))["spec"]


def serve_config_for_fake_gpus(replicas: int) -> dict[str, Any]:
    """The rendered serveConfigV2, with each shard's GPU as the fake nodes' simulated GPU."""
    config = yaml.safe_load(rendered(replicas)["serveConfigV2"])
    for application in config["applications"]:
        application["args"]["resources"] = {
            "device": "cpu",
            "acceleratorResource": SIMULATED_GPU,
        }
    return config


def deploy(config: dict[str, Any]) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def wait_for(probe: Callable[[], T], what: str, timeout: float = 240) -> T:
    # Ray's autoscaler starts and removes nodes in tens of seconds: poll Serve twice a second.
    return wait_until(probe, timeout, what, interval=0.5)


def running_replicas() -> int | None:
    app = serve.status().applications.get(OWNER.name)
    if app is None or app.status != "RUNNING":
        return None
    deployment = app.deployments[REPLICA_DEPLOYMENT]
    states = deployment.replica_states
    return states.get("RUNNING", 0) if set(states) <= {"RUNNING"} else None


def gpu_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(SIMULATED_GPU)}


def replica_nodes(deployment: str = REPLICA_DEPLOYMENT) -> dict[str, str]:
    """Replica id -> the node its actor runs on, for the `deployment` actors alive now."""
    prefix = f"SERVE_REPLICA::{OWNER.name}#{deployment}#"
    return {
        info["Name"].removeprefix(prefix): info["Address"]["NodeID"]
        for info in ray._private.state.actors().values()
        if info["Name"].startswith(prefix) and info["State"] == "ALIVE"
    }


def generated_tokens(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    pattern = r'^grokserve_generation_tokens_total\{[^}]*replica="([^"]+)"[^}]*\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def answers_scaled_to_zero(base: str) -> bool:
    body = {"model": OWNER.name, "prompt": "Return the", "max_tokens": 2}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    if response.status_code != 503:
        return False
    assert response.json()["error"]["code"] == "scaled_to_zero", response.text
    assert int(response.headers["Retry-After"]) >= 1
    return True


def complete(base: str) -> None:
    body = {"model": OWNER.name, "prompt": "Return the", "max_tokens": 2}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.own_ray_driver
def test_replicas_get_nodes_from_rays_autoscaler_and_give_them_back() -> None:
    started = time.monotonic()
    cluster_spec = rendered(1)["rayClusterConfig"]
    ray_cluster = {"metadata": {"name": "grok-1-x7k2p", "namespace": "llm"}, "spec": cluster_spec}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with FakeGPUCluster(ray_cluster) as cluster:
        # What Ray's autoscaler reads from the operator's RayCluster: bounds that never limit a
        # GrokDeployment, one GPU per node, and the idle timeout of the spec.
        worker = cluster.worker_type
        assert worker["min_workers"] == 0 and worker["max_workers"] >= 1024
        assert worker["resources"][SIMULATED_GPU] == 1
        assert cluster.config["idle_timeout_minutes"] * 60 == pytest.approx(IDLE_TIMEOUT_S)
        ray.init(address=cluster.address, logging_level="WARNING")
        try:
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})

            deploy(serve_config_for_fake_gpus(1))
            wait_for(lambda: running_replicas() == 1, "1 replica")
            (first_node,) = gpu_nodes()
            ((first_replica, node),) = replica_nodes().items()
            assert node == first_node
            complete(base)
            ingress = replica_nodes("OpenAIIngress")

            # Scale up: Serve adds a replica in place; its placement group asks for a second
            # GPU node, which Ray's autoscaler launches.
            deploy(serve_config_for_fake_gpus(2))
            wait_for(lambda: running_replicas() == 2, "2 replicas")
            nodes = gpu_nodes()
            assert len(nodes) == 2
            (new_node,) = nodes - {first_node}
            placed = replica_nodes()
            assert placed[first_replica] == first_node  # not restarted by the scale-up
            (new_replica,) = (r for r, n in placed.items() if n == new_node)
            # The new replica serves: requests spread over both until it has generated tokens.
            for _ in range(40):
                complete(base)
                if generated_tokens(base).get(new_replica, 0) > 0:
                    break
            wait_for(
                lambda: generated_tokens(base).get(new_replica, 0) > 0,
                "the new replica to generate",
                timeout=10,
            )

            # Scale to zero: no replica holds a GPU, and the idle nodes go.
            deploy(serve_config_for_fake_gpus(0))
            wait_for(lambda: running_replicas() == 0, "0 replicas")
            wait_for(lambda: not gpu_nodes(), "every GPU node to go")
            # The endpoint still answers, from the ingress that served at 1 and 2 replicas.
            wait_for(lambda: answers_scaled_to_zero(base), "the 503 scaled_to_zero", timeout=30)
            assert replica_nodes("OpenAIIngress").keys() == ingress.keys()

            # And back: one replica, one node, serving again.
            deploy(serve_config_for_fake_gpus(1))
            wait_for(lambda: running_replicas() == 1, "1 replica again")
            assert len(gpu_nodes()) == 1
            complete(base)
            assert replica_nodes("OpenAIIngress").keys() == ingress.keys()
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"autoscaling cluster test: {time.monotonic() - started:.0f} s")
