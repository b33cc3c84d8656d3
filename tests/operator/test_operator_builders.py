"""Child manifests: shape, sizing, ownership, and acceptance by KubeRay's real RayService schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from grokserve.operator.builders import Owner, build_children, build_rayservice, serving_args
from grokserve.operator.render import RenderError, render_documents
from grokserve.operator.replica import replica_plan
from grokserve.operator.spec import parse_resource, parse_spec
from grokserve.serving.config import ServingConfig
from testkit.kube_schemas import kuberay_validator, schema_errors

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "examples").glob("*.yaml"))
OWNER = Owner(name="grok-1", namespace="llm", uid="0b7c5f0e-1d2a-4c2e-9d35-2b8f3f7a9c11")
GROK1 = {"preset": "grok-1", "source": "pvc://weights/grok-1", "quantization": "int8"}


def planned_children(spec, *, with_servicemonitor: bool) -> list[dict]:
    plan = replica_plan(OWNER.name, spec)
    return build_children(OWNER, spec, plan, with_servicemonitor=with_servicemonitor)


def example(name: str):
    return parse_resource(yaml.safe_load((EXAMPLES[0].parent / name).read_text()))


def worker_group(rayservice: dict) -> dict:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_rendered_rayservice_passes_kuberays_schema(path: Path) -> None:
    validator = kuberay_validator("rayservices")
    children = render_documents(path.read_text(), namespace="default", with_servicemonitor=True)
    rayservices = [c for c in children if c["kind"] == "RayService"]
    assert rayservices
    for body in rayservices:
        assert schema_errors(validator, body) == []


def test_two_node_bf16_replicas_get_two_gpu_nodes_each() -> None:
    spec = example("grok-1-bf16-two-node.yaml").model_copy(update={"replicas": 3})
    group = worker_group(build_rayservice(OWNER, spec))
    assert group["groupName"] == "gpu-workers"
    # A new cluster starts with the nodes for 3 replicas; Ray's autoscaler moves them between
    # bounds that no GrokDeployment can exceed (KubeRay ignores changes to the bounds).
    assert group["replicas"] == 6
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 1024 * 64)
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert group["rayStartParams"] == {"num-gpus": "8"}
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_every_ray_node_starts_its_serve_proxy_with_the_admission_gate() -> None:
    spec = example("grok-1-int8-single-node.yaml")
    cluster = build_rayservice(OWNER, spec)["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert {
            "name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
            "value": "grokserve.serving.proxy_gate:middlewares",
        } in container["env"]


def test_at_zero_replicas_only_the_model_deployment_stops() -> None:
    from ray.serve.schema import ServeDeploySchema

    spec = example("grok-1-int8-single-node.yaml").model_copy(update={"replicas": 0})
    config = yaml.safe_load(build_rayservice(OWNER, spec)["spec"]["serveConfigV2"])
    # Serve takes it (it refuses num_replicas 0), and no target capacity stops every deployment:
    # the API ingress and MetricsHub keep the one replica their code gives them.
    ServeDeploySchema.model_validate(config)
    assert "target_capacity" not in config
    (app,) = config["applications"]
    assert app["args"]["replicas"] == 1
    assert app["deployments"] == [
        {
            "name": "GrokReplica",
            "num_replicas": "auto",
            "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1},
            "max_queued_requests": 10_000,
        }
    ]


def test_serve_config_deploys_grokserve_with_the_model_and_replicas() -> None:
    spec = example("grok-1-int8-single-node.yaml")
    body = build_rayservice(OWNER, spec)
    (app,) = yaml.safe_load(body["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "grokserve.serving.app:build_app"
    args = app["args"]
    # The count is a deployment option (Serve scales without restarting replicas), not an arg.
    assert args["replicas"] == 1
    assert app["deployments"] == [
        {
            "name": "GrokReplica",
            "num_replicas": "auto",
            "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1},
            "max_queued_requests": 10_000,
        }
    ]
    assert args["model"] == {
        "preset": "grok-1",
        "dtype": "bfloat16",
        "quantization": "int8",
        "source": "/mnt/models/grok-weights/ckpt-0",
        "tokenizer": "/mnt/models/grok-weights/tokenizer.model",
        "cacheDir": None,  # pvc:// is mounted: nothing is fetched into a cache
        "seed": 0,
    }
    # the degrees the planner chose, written in: the replica runs what the operator planned
    assert args["parallelism"]["tensor"] == 8 and args["parallelism"]["expert"] == 1
    assert args["parallelism"]["gpuMemory"] == "80Gi"
    assert args["serving"]["maxBatchSize"] == 48 and args["serving"]["maxSequenceLength"] == 8192
    mounts = worker_group(body)["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mounts == [
        {"name": "model-grok-weights", "mountPath": "/mnt/models/grok-weights", "readOnly": True}
    ]


def test_serving_args_are_accepted_by_the_serving_config() -> None:
    for path in EXAMPLES:
        spec = parse_resource(yaml.safe_load(path.read_text()))
        ServingConfig.from_args(serving_args(OWNER, spec))


def test_cpu_example_requests_no_gpu() -> None:
    group = worker_group(build_rayservice(OWNER, example("grok-tiny-cpu.yaml")))
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert group["replicas"] == 1 and group["groupName"] == "cpu-workers"


def test_every_child_is_owned_and_labelled() -> None:
    spec = parse_spec(
        {"model": {"preset": "grok-tiny"}, "parallelism": {"device": "cpu", "gpusPerNode": 1}}
    )
    children = planned_children(spec, with_servicemonitor=True)
    assert [c["kind"] for c in children] == [
        "ConfigMap",
        "RayService",
        "Service",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ]
    for child in children:
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == OWNER.uid and ref["controller"] is True
        assert child["metadata"]["labels"]["grokserve.io/deployment"] == "grok-1"
        assert child["metadata"]["namespace"] == "llm"
    kinds = [c["kind"] for c in planned_children(spec, with_servicemonitor=False)]
    assert "ServiceMonitor" not in kinds and kinds.count("Service") == 1


def matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In) applied to labels."""
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
    )


def test_servicemonitor_scrapes_the_api_metrics_of_every_head_serving_or_loading() -> None:
    spec = parse_spec({"model": GROK1})
    children = planned_children(spec, with_servicemonitor=True)
    monitor = next(c for c in children if c["kind"] == "ServiceMonitor")
    scraped = [
        c
        for c in children
        if c["kind"] == "Service" and matches(monitor["spec"]["selector"], c["metadata"]["labels"])
    ]
    # Each endpoint names the port of one of the two Services.
    ports = {
        p["name"]: (s["metadata"]["name"], p["port"]) for s in scraped for p in s["spec"]["ports"]
    }
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert ports == {
        "http": ("grok-1", 8000),
        "metrics": ("grok-1", 8080),
        "api": ("grok-1-metrics", 8000),
    }
    # serving/ingress.py serves the replicas' grokserve_* series at /metrics beside /v1, from
    # the head's Serve proxy also while replicas load: the heads are scraped there, not the
    # endpoint Service (no pod until KubeRay names a serving cluster).
    assert endpoints["api"] == {"port": "api", "path": "/metrics", "interval": "15s"}
    assert "http" not in endpoints and "metrics" in endpoints
    (heads,) = [s for s in scraped if s["metadata"]["name"] == "grok-1-metrics"]
    # KubeRay labels each pod with its node type; the head's template carries the deployment.
    assert heads["spec"]["selector"] == {
        "grokserve.io/deployment": "grok-1",
        "ray.io/node-type": "head",
    }
    rayservice = next(c for c in children if c["kind"] == "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert head["labels"]["grokserve.io/deployment"] == "grok-1"


@pytest.mark.parametrize("strategy", [None, "NewCluster", "None"])
def test_upgrade_strategy_reaches_the_rayservice(strategy: str | None) -> None:
    ray = {"upgradeStrategy": strategy} if strategy else {}
    rayservice = build_rayservice(OWNER, parse_spec({"model": GROK1, "ray": ray}))
    assert rayservice["spec"]["upgradeStrategy"] == {"type": strategy or "NewCluster"}
    assert schema_errors(kuberay_validator("rayservices"), rayservice) == []


def test_pdb_lets_drains_take_one_replica_at_a_time_and_never_blocks_them() -> None:
    one = parse_spec({"model": GROK1, "parallelism": {"nodesPerReplica": 2}})
    two = one.model_copy(update={"replicas": 2})
    pdb = {
        s.replicas: c
        for s in (one, two)
        for c in planned_children(s, with_servicemonitor=False)
        if c["kind"] == "PodDisruptionBudget"
    }
    assert pdb[1]["spec"]["maxUnavailable"] == 2  # 0 would block node drains forever
    assert pdb[2]["spec"]["maxUnavailable"] == 2


def test_render_reports_the_bad_document() -> None:
    text = "apiVersion: grokserve.io/v1alpha1\nkind: GrokDeployment\nmetadata: {name: x}\nspec: {model: {preset: grok-tiny}, parallelism: {tensor: 3}}\n"
    with pytest.raises(
        RenderError, match="GrokDeployment x: spec.parallelism: parallelism.tensor must divide"
    ):
        render_documents(text, namespace="default", with_servicemonitor=False)
    with pytest.raises(RenderError, match="no GrokDeployment object found"):
        render_documents("kind: Pod\n", namespace="default", with_servicemonitor=False)
    with pytest.raises(RenderError, match="not valid YAML"):
        render_documents("a: [", namespace="default", with_servicemonitor=False)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_fits_the_hardware_it_states_with_useful_limits(path: Path) -> None:
    for body in yaml.safe_load_all(path.read_text()):
        spec = parse_resource(body)
        plan = replica_plan(body["metadata"]["name"], spec)  # what the reconcile runs
        assert plan.fits()
        assert plan.cluster.gpu_memory == spec.parallelism.gpu_memory_bytes
        if spec.model.preset == "grok-1":
            # a served Grok-1 takes a real batch at the model's whole context
            assert spec.serving.max_batch_size >= 32
            assert spec.max_sequence_length == 8192
