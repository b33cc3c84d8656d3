"""Pure builders: a GrokDeployment spec -> the manifests of its children (plain dicts).

No API server is involved, so the same functions serve the operator's reconcile and `grokserve render`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from grokserve.model.placement import Plan
from grokserve.operator.kuberay import CLUSTER_LABEL, NODE_TYPE_LABEL, SERVE_LABEL
from grokserve.operator.replica import (
    MODEL_MOUNT_ROOT,
    WEIGHTS_CACHE_MOUNT,
    claim_and_path,
    fetches_weights,
    replica_config,
)
from grokserve.operator.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    GrokDeploymentSpec,
    ParallelismSpec,
)
from grokserve.serving.config import PROXY_ENVIRONMENT, REPLICA_DEPLOYMENT

SERVE_IMPORT_PATH = "grokserve.serving.app:build_app"
SERVE_PORT = 8000
METRICS_PORT = 8080
DEPLOYMENT_LABEL = f"{API_GROUP}/deployment"
COMPONENT_LABEL = "app.kubernetes.io/component"
WEIGHTS_CACHE_VOLUME = "weights-cache"
SERVING_CONFIG_KEY = "serving.yaml"


@dataclass(frozen=True)
class Owner:
    """The GrokDeployment the children belong to; uid is None when rendering offline."""

    name: str
    namespace: str
    uid: str | None = None


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "grokserve",
        "app.kubernetes.io/instance": owner.name,
        COMPONENT_LABEL: component,
        "app.kubernetes.io/managed-by": "grokserve-operator",
        DEPLOYMENT_LABEL: owner.name,
    }


def selector(owner: Owner) -> str:
    """The label selector of the deployment's pods, as the /scale subresource reports it."""
    return f"{DEPLOYMENT_LABEL}={owner.name}"


def _metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
    }
    if owner.uid is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return metadata


def _with_weights_access(
    pod: dict[str, Any], container: dict[str, Any], spec: GrokDeploymentSpec
) -> None:
    """The credentials Secret as environment, and the weights cache volume where one is used."""
    model = spec.model
    if model.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": model.credentials_secret}}]
    if not fetches_weights(spec):
        return
    cache = model.cache
    if cache.type == "hostPath":
        source: dict[str, Any] = {"hostPath": {"path": cache.path, "type": "DirectoryOrCreate"}}
    elif cache.type == "pvc":
        source = {"persistentVolumeClaim": {"claimName": cache.claim}}
    else:
        source = {"emptyDir": {"sizeLimit": cache.size_limit} if cache.size_limit else {}}
    pod.setdefault("volumes", []).append({"name": WEIGHTS_CACHE_VOLUME, **source})
    container.setdefault("volumeMounts", []).append(
        {"name": WEIGHTS_CACHE_VOLUME, "mountPath": WEIGHTS_CACHE_MOUNT}
    )


def _claims(spec: GrokDeploymentSpec) -> list[str]:
    urls = (spec.model.source, spec.model.tokenizer)
    return sorted({claim_and_path(u)[0] for u in urls if u and u.startswith("pvc://")})


def serving_args(owner: Owner, spec: GrokDeploymentSpec) -> dict[str, Any]:
    """The arguments of `build_app`: the replica's ServingConfig, camelCase, with the tensor and
    expert degrees the operator planned."""
    return replica_config(owner.name, spec).resolved(spec.model.config).to_args()


def serve_config(owner: Owner, spec: GrokDeploymentSpec) -> dict[str, Any]:
    """The Serve config; the replica count reaches the Ray cluster only through here.

    Serve hashes an application's args into its code version, and a new code version restarts
    every replica (reloading the weights): the count goes as the GrokReplica deployment's
    options instead, which Serve changes in place, and Ray's autoscaler finds nodes for the
    replicas it adds (see _worker_group). At spec.replicas 0 only GrokReplica runs none
    (ServingConfig.replica_count_options): the API ingress and MetricsHub keep running on the
    head (they ask for no CPU), answer 503 `scaled_to_zero` and export the refused requests as
    waiting, which is what wakes the deployment; no replica holds a worker node, and Ray's
    autoscaler removes the idle ones.
    """
    config = replica_config(owner.name, spec).resolved(spec.model.config)
    args = config.to_args()
    application: dict[str, Any] = {
        "name": owner.name,
        "route_prefix": "/",
        "import_path": SERVE_IMPORT_PATH,
        # The same args at every replica count: a change of the count never restarts a replica.
        "args": {**args, "replicas": 1},
    }
    options = config.replica_count_options()
    application["deployments"] = [{"name": REPLICA_DEPLOYMENT, **options}]
    return {"applications": [application]}


def worker_nodes(spec: GrokDeploymentSpec) -> int:
    return spec.replicas * spec.parallelism.nodes_per_replica


def worker_group_name(spec: GrokDeploymentSpec) -> str:
    return f"{spec.parallelism.device}-workers"


def _largest(model: type[BaseModel], field: str) -> int:
    """The `le` bound of a spec field: the most that a GrokDeployment can ask for."""
    return next(rule.le for rule in model.model_fields[field].metadata if hasattr(rule, "le"))


# The worker group's bounds cover every replica count any GrokDeployment can ask for. KubeRay's
# RayService hash leaves out a worker group's replicas, minReplicas and maxReplicas
# (GenerateHashWithoutReplicasAndWorkersToDelete): a change to them never reaches a running
# cluster. Bounds that never change need not reach it; the replica count travels in the Serve
# config instead, which KubeRay applies in place, and Ray's autoscaler (enableInTreeAutoscaling)
# adds worker pods for the new replicas' placement groups and removes idle ones.
MAX_WORKER_NODES = _largest(GrokDeploymentSpec, "replicas") * _largest(
    ParallelismSpec, "nodes_per_replica"
)


def placement_summary(spec: GrokDeploymentSpec, plan: Plan) -> str:
    """How replicas are laid out: the Ray shape, then the plan of one replica, rank by rank."""
    par = spec.parallelism
    unit = "GPUs" if par.device == "gpu" else "CPU shards"
    return (
        f"{spec.replicas} replica(s) × {par.nodes_per_replica} node(s) × {par.gpus_per_node} "
        f"{unit}, {par.strategy}; each replica: {plan.summary()}"
    )


def _container(
    name: str, image: str, cpu: str, memory: str, extra: dict[str, Any]
) -> dict[str, Any]:
    amounts = {"cpu": cpu, "memory": memory, **extra}
    return {
        "name": name,
        "image": image,
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        # Serve starts an HTTP proxy on every node: each refuses what the replicas cannot hold.
        "env": [{"name": key, "value": value} for key, value in PROXY_ENVIRONMENT.items()],
    }


def _with_model_volumes(pod: dict[str, Any], container: dict[str, Any], claims: list[str]) -> None:
    if not claims:
        return
    pod["volumes"] = [
        {"name": f"model-{claim}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        for claim in claims
    ]
    container["volumeMounts"] = [
        {"name": f"model-{claim}", "mountPath": f"{MODEL_MOUNT_ROOT}/{claim}", "readOnly": True}
        for claim in claims
    ]


def _head_group(owner: Owner, spec: GrokDeploymentSpec, claims: list[str]) -> dict[str, Any]:
    container = _container(
        "ray-head",
        spec.ray.image,
        spec.ray.head_resources.cpu,
        spec.ray.head_resources.memory,
        {},
    )
    container["ports"] = [
        # KubeRay's names: it finds the GCS and dashboard ports by them.
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": SERVE_PORT},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    pod: dict[str, Any] = {"containers": [container]}
    _with_model_volumes(pod, container, claims)
    _with_weights_access(pod, container, spec)
    if spec.ray.service_account_name:
        pod["serviceAccountName"] = spec.ray.service_account_name
    return {
        # The head holds no model work: replicas and shards must land on the worker group, where
        # Ray's autoscaler adds nodes for them (on CPU too). Serve's own actors need no CPU.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
        "template": {"metadata": {"labels": labels(owner, "ray-head")}, "spec": pod},
    }


def _worker_group(owner: Owner, spec: GrokDeploymentSpec, claims: list[str]) -> dict[str, Any]:
    par = spec.parallelism
    gpus = {spec.ray.gpu_resource_name: str(par.gpus_per_node)} if par.device == "gpu" else {}
    container = _container(
        "ray-worker",
        spec.ray.image,
        spec.ray.worker_resources.cpu,
        spec.ray.worker_resources.memory,
        gpus,
    )
    container["ports"] = [{"name": "metrics", "containerPort": METRICS_PORT}]
    pod: dict[str, Any] = {"containers": [container]}
    _with_model_volumes(pod, container, claims)
    _with_weights_access(pod, container, spec)
    if spec.ray.node_selector:
        pod["nodeSelector"] = dict(spec.ray.node_selector)
    if spec.ray.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.ray.tolerations
        ]
    if spec.ray.service_account_name:
        pod["serviceAccountName"] = spec.ray.service_account_name
    return {
        "groupName": worker_group_name(spec),
        # Where a new cluster starts (KubeRay's upgrade, or the first one); from then on Ray's
        # autoscaler owns the count.
        "replicas": worker_nodes(spec),
        "minReplicas": 0,
        "maxReplicas": MAX_WORKER_NODES,
        # Explicit, so that GPUs under another resource name than nvidia.com/gpu count too.
        "rayStartParams": {"num-gpus": str(par.gpus_per_node)} if par.device == "gpu" else {},
        "template": {"metadata": {"labels": labels(owner, "ray-worker")}, "spec": pod},
    }


def build_rayservice(owner: Owner, spec: GrokDeploymentSpec) -> dict[str, Any]:
    claims = _claims(spec)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(owner, owner.name, "rayservice"),
        "spec": {
            # KubeRay takes serveConfigV2 as a YAML string.
            "serveConfigV2": yaml.safe_dump(
                serve_config(owner, spec), sort_keys=False, allow_unicode=True
            ),
            "rayClusterConfig": {
                "rayVersion": spec.ray.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": spec.ray.idle_timeout_seconds},
                "headGroupSpec": _head_group(owner, spec, claims),
                "workerGroupSpecs": [_worker_group(owner, spec, claims)],
            },
            # Also the default: the RayService states the strategy KubeRay applies, whatever
            # KubeRay's own default.
            "upgradeStrategy": {"type": spec.ray.upgrade_strategy},
        },
    }


def build_service(owner: Owner, serving_cluster: str | None) -> dict[str, Any]:
    """The OpenAI endpoint: the pods of the Ray cluster KubeRay routes to that it marks as serving.

    KubeRay's own serve Service pins the cluster the same way and switches when a new cluster is
    ready; selecting by deployment alone would also reach the not-yet-ready cluster of an
    upgrade. `serving_cluster` is None until KubeRay names one: the Service then selects nothing.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, "endpoint"),
        "spec": {
            "type": "ClusterIP",
            "selector": {
                DEPLOYMENT_LABEL: owner.name,
                SERVE_LABEL: "true",
                CLUSTER_LABEL: serving_cluster or "",
            },
            "ports": [
                {"name": "http", "port": SERVE_PORT, "targetPort": SERVE_PORT},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
            ],
        },
    }


def build_metrics_service(owner: Owner) -> dict[str, Any]:
    """What Prometheus scrapes for the API's /metrics: the head pod of each of the deployment's
    Ray clusters, serving or not yet. The endpoint Service selects no pod until KubeRay names a
    serving cluster, so replicas loading their weights (a first start, an upgrade's new cluster)
    would go unseen; the head's Serve proxy answers /metrics meanwhile. Headless: no traffic."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, f"{owner.name}-metrics", "metrics"),
        "spec": {
            "clusterIP": "None",
            "selector": {DEPLOYMENT_LABEL: owner.name, NODE_TYPE_LABEL: "head"},
            "ports": [{"name": "api", "port": SERVE_PORT, "targetPort": SERVE_PORT}],
        },
    }


def endpoint(owner: Owner) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{SERVE_PORT}/v1"


def build_configmap(owner: Owner, spec: GrokDeploymentSpec, plan: Plan) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, f"{owner.name}-serving", "serving-config"),
        "data": {
            SERVING_CONFIG_KEY: yaml.safe_dump(
                serving_args(owner, spec), sort_keys=False, allow_unicode=True
            ),
            "placement": placement_summary(spec, plan),
        },
    }


def build_servicemonitor(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(owner, owner.name, "metrics"),
        "spec": {
            # Two Services, each with one of the ports: the heads' API port (grokserve's /metrics,
            # the queue gauges the autoscaler reads and the weights loading), and the serving
            # pods' `metrics` port (Ray's).
            "selector": {
                "matchLabels": {
                    k: v for k, v in labels(owner, "metrics").items() if k != COMPONENT_LABEL
                },
                "matchExpressions": [
                    {"key": COMPONENT_LABEL, "operator": "In", "values": ["endpoint", "metrics"]}
                ],
            },
            "endpoints": [
                {"port": "api", "path": "/metrics", "interval": "15s"},
                {"port": "metrics", "interval": "15s"},
            ],
        },
    }


def build_pdb(owner: Owner, spec: GrokDeploymentSpec) -> dict[str, Any]:
    # Evicting any node of a multi-node replica stops that replica, so drains may take down at most
    # one replica's worth of nodes at a time. Also with a single replica: a budget of 0 would block
    # every node drain (and cluster upgrades) for as long as the deployment exists.
    unavailable = spec.parallelism.nodes_per_replica
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, owner.name, "disruption-budget"),
        "spec": {
            "maxUnavailable": unavailable,
            "selector": {"matchLabels": {DEPLOYMENT_LABEL: owner.name, NODE_TYPE_LABEL: "worker"}},
        },
    }


def build_children(
    owner: Owner,
    spec: GrokDeploymentSpec,
    plan: Plan,
    *,
    with_servicemonitor: bool,
    serving_cluster: str | None = None,
) -> list[dict[str, Any]]:
    """Every child of a GrokDeployment whose replica has `plan`, in the order they are applied."""
    children = [
        build_configmap(owner, spec, plan),
        build_rayservice(owner, spec),
        build_service(owner, serving_cluster),
        build_pdb(owner, spec),
    ]
    if with_servicemonitor:
        children += [build_metrics_service(owner), build_servicemonitor(owner)]
    return children
