"""Run the serving stack on this machine: a local Ray cluster (or RAY_ADDRESS), Serve, the app.

`--nodes N --gpus-per-node K` simulates N nodes on one machine with Ray's cluster utilities: every
simulated node advertises K units of the custom resource SIMULATED_GPU, and each shard bundle asks for
one, so the placement group spreads a replica's G = N × K shards across the "nodes" as it would across
GPU nodes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import ray
from ray import serve

from grokserve.serving.app import REPLICA_DEPLOYMENT, build_app
from grokserve.serving.config import PROXY_ENVIRONMENT, ServingConfig

SIMULATED_GPU = "simulated_gpu"
APP_NAME = "grok"


@dataclass(frozen=True)
class NodeResources:
    num_cpus: int
    resources: dict[str, float]


@dataclass(frozen=True)
class ClusterShape:
    nodes: int = 0  # 0: one plain local Ray node, no simulated accelerators
    gpus_per_node: int = 1

    def apply(self, config: ServingConfig) -> ServingConfig:
        """The config with its parallelism and shard resources matching the simulated cluster."""
        if not self.nodes:
            return config
        parallelism = config.parallelism.model_copy(
            update={"gpus_per_node": self.gpus_per_node, "nodes_per_replica": self.nodes}
        )
        resources = config.resources.model_copy(update={"accelerator_resource": SIMULATED_GPU})
        # Round-trip through validation so that tensor/expert degrees are re-checked.
        return ServingConfig.model_validate(
            {
                **config.model_dump(),
                "parallelism": parallelism.model_dump(),
                "resources": resources.model_dump(),
            }
        )

    def worker_nodes(self, config: ServingConfig) -> list[NodeResources]:
        """The local Ray nodes to start so that all of `config`'s replicas fit at once.

        CPUs are logical: enough for every bundle, independent of the machine's core count.
        """
        if not self.nodes:
            per_replica = sum(bundle["CPU"] for bundle in config.placement_group_bundles())
            # Room for other applications deployed beside this one (tests, bench variants).
            return [NodeResources(math.ceil(config.replicas * per_replica) + 2, {})]
        # `nodes` counts the nodes of one replica; each replica gets its own.
        node = NodeResources(
            # Room for a replica actor and other apps' bundles.
            num_cpus=math.ceil(self.gpus_per_node * config.resources.cpus_per_shard) + 4,
            resources={SIMULATED_GPU: self.gpus_per_node},
        )
        return [node] * (self.nodes * config.replicas)


class LocalServing:
    """Starts Ray (unless RAY_ADDRESS names one), Serve on host:port, and the app; `close` undoes it:
    on a cluster it joined, only by deleting the applications it deployed, as others may share it.

    `shape` only builds the (simulated) cluster; `ClusterShape.apply` fits a config to it.
    """

    def __init__(
        self,
        config: ServingConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        shape: ClusterShape = ClusterShape(),
        ray_address: str | None = None,
    ) -> None:
        self.shape = shape
        self.config = config
        self.host = host
        self.port = port
        self.ray_address = ray_address if ray_address is not None else os.environ.get("RAY_ADDRESS")
        self.url = f"http://{host}:{port}"
        self._cluster: Any = None
        self._deployed: set[str] = set()

    def start(self, ready_timeout_s: float = 300.0) -> LocalServing:
        """Ray, Serve and the application at `/`."""
        self.start_ray_and_serve()
        try:
            self.deploy(self.config, APP_NAME, "/", ready_timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def start_ray_and_serve(self) -> LocalServing:
        """Ray and Serve only; `deploy` applications yourself."""
        try:
            self._start_ray()
            # One HTTP proxy: simulated nodes share this machine's ports.
            serve.start(
                proxy_location="HeadOnly", http_options={"host": self.host, "port": self.port}
            )
        except BaseException:
            self.close()
            raise
        return self

    def delete(self, name: str) -> None:
        serve.delete(name)
        self._deployed.discard(name)

    def deploy(
        self, config: ServingConfig, name: str, route_prefix: str, ready_timeout_s: float = 300.0
    ) -> str:
        """Deploy (or redeploy) one application and wait until it answers; returns its base URL."""
        self._deployed.add(name)
        serve.run(build_app(config.to_args()), name=name, route_prefix=route_prefix, blocking=False)
        base = self.url + route_prefix.rstrip("/")
        self._wait_ready(name, base + "/readyz", config.replicas, ready_timeout_s)
        return base

    @staticmethod
    def _wait_ready(name: str, url: str, replicas: int, timeout_s: float) -> None:
        """Until every model replica runs and the API answers: /readyz alone passes with one
        (at zero replicas: until the API answers that it is scaled to zero)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = serve.status().applications.get(name)
            if app is not None and app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"the {name!r} application failed to deploy: {app.message}")
            if app is not None and app.status == "RUNNING" and _running_replicas(app) == replicas:
                try:
                    # At zero replicas the API answers, not ready (503 scaled_to_zero).
                    if httpx.get(url, timeout=5).status_code == (200 if replicas else 503):
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise TimeoutError(f"{url} not ready after {timeout_s:g}s; see the Ray logs")

    def _start_ray(self) -> None:
        quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if self.ray_address:
            ray.init(address=self.ray_address, **quiet)
            return
        # The cluster's processes inherit this environment: its proxy gets the admission gate.
        # (A cluster joined at RAY_ADDRESS has its own: see PROXY_ENVIRONMENT.)
        os.environ.update(PROXY_ENVIRONMENT)
        nodes = self.shape.worker_nodes(self.config)
        if not self.shape.nodes:
            # address="local": a new cluster even where another one runs on this machine (plain
            # ray.init would join that one and then refuse num_cpus).
            ray.init(address="local", num_cpus=nodes[0].num_cpus, include_dashboard=False, **quiet)
            return
        from ray.cluster_utils import Cluster

        self._cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
        )
        for node in nodes:
            self._cluster.add_node(num_cpus=node.num_cpus, resources=node.resources)
        ray.init(address=self._cluster.address, **quiet)

    def close(self) -> None:
        if ray.is_initialized():
            try:
                # A cluster this process started goes away whole below: Serve's graceful
                # shutdown (draining every replica) would only make Ctrl-C slow.
                if self.ray_address:
                    for name in list(self._deployed):
                        self.delete(name)
            finally:
                # Disconnects this driver; a joined cluster keeps running.
                ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None

    def __enter__(self) -> LocalServing:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _running_replicas(app: Any) -> int:
    """RUNNING model replicas of a `serve.status()` application, and 0 until its redeploy is
    done (while it updates, the old version's replicas still count as RUNNING)."""
    if app.status != "RUNNING":
        return 0
    deployment = app.deployments.get(REPLICA_DEPLOYMENT)
    return 0 if deployment is None else deployment.replica_states.get("RUNNING", 0)
