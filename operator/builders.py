"""Pure builders: a GrokDeployment spec -> the manifests of its children (plain dicts).

No API server is involved, so the same functions serve the operator's reconcile and `grokserve render`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from grokserve.model.placement import Plan
from grokserve.operator.replica import MODEL_MOUNT_ROOT, claim_and_path, replica_config
from grokserve.operator.spec import API_GROUP, API_VERSION, KIND, GrokDeploymentSpec

SERVE_IMPORT_PATH = "grokserve.serving.app:build_app"
SERVE_PORT = 8000
METRICS_PORT = 8080
DEPLOYMENT_LABEL = f"{API_GROUP}/deployment"
WORKER_GROUP = "gpu-workers"
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
        "app.kubernetes.io/component": component,
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


def _claims(spec: GrokDeploymentSpec) -> list[str]:
    urls = (spec.model.source, spec.model.tokenizer)
    return sorted({claim_and_path(u)[0] for u in urls if u and u.startswith("pvc://")})


def serving_args(owner: Owner, spec: GrokDeploymentSpec) -> dict[str, Any]:
    """The arguments of `build_app`: the replica's ServingConfig, camelCase, with the tensor and
    expert degrees the operator planned."""
    return replica_config(owner.name, spec).resolved(spec.model.config).to_args()


def serve_config(owner: Owner, spec: GrokDeploymentSpec) -> dict[str, Any]:
    return {
        "applications": [
            {
                "name": owner.name,
                "route_prefix": "/",
                "import_path": SERVE_IMPORT_PATH,
                "args": serving_args(owner, spec),
            }
        ]
    }


def worker_nodes(spec: GrokDeploymentSpec) -> int:
    return spec.replicas * spec.parallelism.nodes_per_replica


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
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": SERVE_PORT},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    pod: dict[str, Any] = {"containers": [container]}
    _with_model_volumes(pod, container, claims)
    if spec.ray.service_account_name:
        pod["serviceAccountName"] = spec.ray.service_account_name
    return {
        # The head holds no GPU work: replicas and shards must land on the worker group.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
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
    if spec.ray.node_selector:
        pod["nodeSelector"] = dict(spec.ray.node_selector)
    if spec.ray.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.ray.tolerations
        ]
    if spec.ray.service_account_name:
        pod["serviceAccountName"] = spec.ray.service_account_name
    nodes = worker_nodes(spec)
    return {
        "groupName": WORKER_GROUP,
        "replicas": nodes,
        "minReplicas": nodes,
        "maxReplicas": nodes,
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
                "headGroupSpec": _head_group(owner, spec, claims),
                "workerGroupSpecs": [_worker_group(owner, spec, claims)],
            },
            # Also the default: the RayService states the strategy KubeRay applies, whatever
            # KubeRay's own default.
            "upgradeStrategy": {"type": spec.ray.upgrade_strategy},
        },
    }


def build_service(owner: Owner) -> dict[str, Any]:
    """The OpenAI endpoint: every pod of this deployment that KubeRay marks as serving."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, "endpoint"),
        "spec": {
            "type": "ClusterIP",
            "selector": {DEPLOYMENT_LABEL: owner.name, "ray.io/serve": "true"},
            "ports": [
                {"name": "http", "port": SERVE_PORT, "targetPort": SERVE_PORT},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
            ],
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
            "selector": {"matchLabels": labels(owner, "endpoint")},
            # The API port's /metrics holds the queue gauges the autoscaler reads; `metrics` is Ray's.
            "endpoints": [
                {"port": "http", "path": "/metrics", "interval": "15s"},
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
            "selector": {
                "matchLabels": {DEPLOYMENT_LABEL: owner.name, "ray.io/node-type": "worker"}
            },
        },
    }


def build_children(
    owner: Owner, spec: GrokDeploymentSpec, plan: Plan, *, with_servicemonitor: bool
) -> list[dict[str, Any]]:
    """Every child of a GrokDeployment whose replica has `plan`, in the order they are applied."""
    children = [
        build_configmap(owner, spec, plan),
        build_rayservice(owner, spec),
        build_service(owner),
        build_pdb(owner, spec),
    ]
    if with_servicemonitor:
        children.append(build_servicemonitor(owner))
    return children
