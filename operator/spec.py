"""The GrokDeployment spec (grokserve.io/v1alpha1) as pydantic models.

This is the source of truth for the custom resource: the CRD's openAPIV3Schema is generated from
these models (`grokserve.operator.crd`), and the operator parses every object with `parse_spec`, so
that what the CRD cannot express (a context longer than the model's, say) still ends in a specific
error instead of a crash loop.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from grokserve.operator.kube_formats import (
    CpuQuantity,
    DNS1123SubdomainName,
    ExtendedResourceName,
    ImageReference,
    LabelKey,
    LabelValue,
    MemoryQuantity,
)
from grokserve.operator.presets import PRESET_SHAPES, CamelModel, ModelShape

API_GROUP = "grokserve.io"
API_VERSION = "v1alpha1"
KIND = "GrokDeployment"
PLURAL = "grokdeployments"

# Children take the deployment's name (the Service needs a DNS-1035 label) and KubeRay derives
# longer names from the RayService's, so names are kept short enough for both.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 40
PresetName = Literal[tuple(PRESET_SHAPES)]  # type: ignore[valid-type]
# pvc://CLAIM/PATH: the claim is also a volume name, `model-CLAIM`, a DNS-1123 label (≤ 63).
SOURCE_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]{0,55}[a-z0-9])?(/.*)?|file:///.*|(s3|gs|hf)://[^/].*)$"
)
URL_MAX_LENGTH = 2048
# Bounds of every list and map: kopf keeps the whole spec in one annotation (≤ 256 KiB).
MAX_TOLERATIONS = 32
MAX_NODE_SELECTOR = 32


class SpecError(ValueError):
    """A GrokDeployment that cannot be deployed; `message` names the offending field(s)."""

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ModelSpec(CamelModel):
    """Which model to serve and how its weights are held on the GPUs."""

    preset: PresetName = Field(  # type: ignore[valid-type]
        description="Architecture preset; grok-1 is the released model."
    )
    source: str | None = Field(
        None,
        pattern=SOURCE_PATTERN,
        max_length=URL_MAX_LENGTH,
        description="Checkpoint location: pvc://CLAIM/PATH, file://PATH, s3://, gs:// or hf://. "
        "Unset serves random weights (tests and demos only).",
    )
    tokenizer: str | None = Field(
        None,
        pattern=SOURCE_PATTERN,
        max_length=URL_MAX_LENGTH,
        description="SentencePiece tokenizer model, same URL schemes as source.",
    )
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Activation and (unquantized) weight dtype."
    )
    quantization: Literal["none", "int8"] = Field(
        "none",
        description="int8 keeps the released 8-bit weights on the GPU (half the memory of bf16).",
    )

    @property
    def shape(self) -> ModelShape:
        return PRESET_SHAPES[self.preset]


class ParallelismSpec(CamelModel):
    """How one model replica is spread over accelerators: G = gpusPerNode × nodesPerReplica shards."""

    device: Literal["gpu", "cpu"] = Field(
        "gpu",
        description="gpu requests one GPU per shard; cpu runs shards on CPU (small models only).",
    )
    gpus_per_node: int = Field(
        8, ge=1, le=64, description="Shards (GPUs) each worker node of a replica contributes."
    )
    nodes_per_replica: int = Field(1, ge=1, le=64, description="Worker nodes one replica spans.")
    tensor: int = Field(
        1,
        ge=1,
        le=4096,
        description="Attention heads are split across this many shards (divides the kv heads).",
    )
    expert: int = Field(
        1,
        ge=1,
        le=4096,
        description="Experts are split across this many shards (1 = every shard holds a slice of each expert).",
    )
    placement: Literal["pack", "spread", "strict-spread"] = Field(
        "pack",
        description="Ray placement strategy of a replica's shards (PACK, SPREAD, STRICT_SPREAD).",
    )

    @property
    def shards(self) -> int:
        return self.gpus_per_node * self.nodes_per_replica

    @property
    def gpus_per_replica(self) -> int:
        return self.shards if self.device == "gpu" else 0


class AutoscalingSpec(CamelModel):
    """The built-in queue-based autoscaler; when enabled it is the only writer of spec.replicas."""

    enabled: bool = Field(False, description="Run the built-in autoscaler for this deployment.")
    min_replicas: int = Field(
        1,
        ge=0,
        le=1024,
        description="Fewest replicas; 0 allows scale to zero after scaleToZeroIdleSeconds.",
    )
    max_replicas: int = Field(1, ge=1, le=1024, description="Most replicas.")
    prometheus_url: str | None = Field(
        None,
        pattern=r"^https?://[^/].*",
        max_length=URL_MAX_LENGTH,
        description="Prometheus HTTP API base URL (required when enabled).",
    )
    query: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="PromQL override returning the waiting requests; default sums "
        "grokserve_requests_waiting over this deployment's replicas.",
    )
    # At least 0.01: below it no queue length means anything, and ratios overflow (1e-320).
    target_queue_per_replica: float = Field(
        8.0,
        ge=0.01,
        le=1_000_000,
        description="Waiting requests per replica the autoscaler aims for.",
    )
    tolerance: float = Field(
        0.1, ge=0, le=1, description="No scaling while observed/target is within 1 ± tolerance."
    )
    scale_up_stabilization_seconds: int = Field(
        0, ge=0, le=86_400, description="Scale up to the lowest recommendation over this window."
    )
    scale_down_stabilization_seconds: int = Field(
        300,
        ge=0,
        le=86_400,
        description="Scale down to the highest recommendation over this window.",
    )
    scale_up_limit: int = Field(
        4, ge=1, le=1024, description="Most replicas added in one evaluation."
    )
    scale_down_limit: int = Field(
        1, ge=1, le=1024, description="Most replicas removed in one evaluation."
    )
    evaluation_interval_seconds: int = Field(
        30, ge=5, le=3600, description="Seconds between autoscaler evaluations."
    )
    scale_to_zero_idle_seconds: int | None = Field(
        None,
        ge=60,
        le=604_800,
        description="With minReplicas 0: scale to zero after no request waited or ran for this long.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must be ≤ maxReplicas ({self.max_replicas})"
            )
        if self.enabled and self.prometheus_url is None:
            raise ValueError("prometheusUrl is required when enabled is true")
        if self.min_replicas == 0 and self.scale_to_zero_idle_seconds is None:
            raise ValueError(
                "minReplicas 0 needs scaleToZeroIdleSeconds "
                "(how long the deployment must be idle before it scales to zero)"
            )
        return self


class ServingSpec(CamelModel):
    """Per-replica limits of the serving engine."""

    max_batch_size: int = Field(
        64, ge=1, le=4096, description="Requests decoded together per replica."
    )
    max_sequence_length: int | None = Field(
        None,
        ge=2,
        le=1 << 24,
        description="Prompt + generated tokens per request; unset uses the model's context.",
    )
    max_queued_requests: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="Requests waiting per replica; beyond this the API answers 429.",
    )


class ResourceAmounts(CamelModel):
    """CPU and memory of a Ray pod (Kubernetes quantities); requests equal limits."""

    cpu: CpuQuantity = Field(description="CPU quantity, e.g. 8 or 500m.")
    memory: MemoryQuantity = Field(description="Memory quantity, e.g. 64Gi.")


class Toleration(CamelModel):
    """A Kubernetes toleration for the Ray pods (checked as the API server checks a pod's)."""

    # The same checks as `_as_kubernetes_checks_it`, for the API server to refuse at admission.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.key) || self.operator == 'Exists'",
                    "message": "a toleration without a key must have operator Exists",
                },
                {
                    "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists must not have a value",
                },
                {
                    "rule": "!has(self.tolerationSeconds) || "
                    "(has(self.effect) && self.effect == 'NoExecute')",
                    "message": "tolerationSeconds needs effect NoExecute",
                    "fieldPath": ".tolerationSeconds",
                },
            ]
        }
    )

    key: LabelKey | None = Field(
        None, description="Taint key; unset with operator Exists matches all."
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; unset matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, le=1 << 31, description="For NoExecute: how long to stay."
    )

    @model_validator(mode="after")
    def _as_kubernetes_checks_it(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key must have operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not have a value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class RaySpec(CamelModel):
    """The Ray cluster KubeRay runs for this deployment."""

    image: ImageReference = Field(
        "ghcr.io/grokserve/grokserve-serving:0.1.0",
        description="Serving image (Ray + grokserve[serve]) for head and workers.",
    )
    ray_version: str = Field(
        "2.60.0",
        pattern=r"^[0-9]+\.[0-9]+\.[0-9]+([-+.a-z0-9]*)$",
        max_length=32,
        description="Ray version inside the image.",
    )
    head_resources: ResourceAmounts = Field(
        ResourceAmounts(cpu="4", memory="16Gi"), description="Head pod CPU and memory."
    )
    worker_resources: ResourceAmounts = Field(
        ResourceAmounts(cpu="32", memory="256Gi"),
        description="CPU and memory of each worker pod (GPUs come from parallelism).",
    )
    gpu_resource_name: ExtendedResourceName = Field(
        "nvidia.com/gpu",
        description="Extended resource name of a GPU (domain-qualified, e.g. amd.com/gpu).",
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_NODE_SELECTOR,
        description="Node selector for the GPU worker pods.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=MAX_TOLERATIONS,
        description="Tolerations for the GPU worker pods.",
    )
    service_account_name: DNS1123SubdomainName | None = Field(
        None, description="Service account of the Ray pods (e.g. for s3:// or gs:// access)."
    )
    # Not KubeRay's NewClusterWithIncrementalUpgrade: it needs clusterUpgradeOptions (a Gateway
    # class, step sizes) that this spec does not carry.
    upgrade_strategy: Literal["NewCluster", "None"] = Field(
        "NewCluster",
        description="KubeRay's upgrade strategy when the cluster shape changes (serve config changes "
        "always apply in place): NewCluster starts a new cluster and switches traffic once it serves; "
        "None leaves the running cluster as it is.",
    )


class GrokDeploymentSpec(CamelModel):
    """A served Grok model: what to serve, how to split it, how many replicas, on which Ray cluster."""

    model: ModelSpec = Field(description="The model and its weights.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="How one replica is split over GPUs and nodes."
    )
    replicas: int = Field(1, ge=0, le=1024, description="Model replicas (driven by /scale).")
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Queue-based autoscaling of replicas."
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="Serving engine limits.")
    ray: RaySpec = Field(default_factory=RaySpec, description="The Ray cluster and its pods.")

    @model_validator(mode="after")
    def _fits_the_model(self) -> GrokDeploymentSpec:
        shape, par = self.model.shape, self.parallelism
        for field in ("tensor", "expert"):
            degree = getattr(par, field)
            if par.shards % degree:
                raise ValueError(
                    f"parallelism.{field}={degree} must divide the shards per replica "
                    f"(gpusPerNode × nodesPerReplica = {par.shards})"
                )
        if shape.num_kv_heads % par.tensor:
            raise ValueError(
                f"parallelism.tensor={par.tensor} must divide the model's {shape.num_kv_heads} kv heads"
            )
        if shape.num_experts % par.expert:
            raise ValueError(
                f"parallelism.expert={par.expert} must divide the model's {shape.num_experts} experts"
            )
        limit = self.serving.max_sequence_length
        if limit is not None and limit > shape.sequence_len:
            raise ValueError(
                f"serving.maxSequenceLength={limit} exceeds the model's context of "
                f"{shape.sequence_len} tokens"
            )
        scaling = self.autoscaling
        if scaling.enabled and not scaling.min_replicas <= self.replicas <= scaling.max_replicas:
            raise ValueError(
                f"replicas={self.replicas} must lie within autoscaling.minReplicas.."
                f"maxReplicas ({scaling.min_replicas}..{scaling.max_replicas}) while autoscaling is enabled"
            )
        return self

    @property
    def max_sequence_length(self) -> int:
        return self.serving.max_sequence_length or self.model.shape.sequence_len


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"spec.{where}: {message}" if where else f"spec: {message}")
    return "; ".join(lines)


def check_name(name: Any) -> None:
    """A GrokDeployment's metadata.name must also work as its children's names."""
    if not isinstance(name, str) or not name:
        raise SpecError("metadata.name is required", reason="InvalidName")
    if len(name) > MAX_NAME_LENGTH or not re.match(NAME_PATTERN, name):
        raise SpecError(
            f"metadata.name {name!r} must be at most {MAX_NAME_LENGTH} characters of lowercase "
            "letters, digits and '-', starting with a letter (it names the Service and RayService)",
            reason="InvalidName",
        )


def parse_spec(spec: Any) -> GrokDeploymentSpec:
    """Validate a GrokDeployment's `spec` (camelCase, as in the YAML); raises SpecError."""
    if not isinstance(spec, dict):
        raise SpecError(f"spec must be a mapping, got {type(spec).__name__}")
    try:
        return GrokDeploymentSpec.model_validate(spec)
    except ValidationError as error:
        raise SpecError(_describe(error)) from None


def parse_resource(body: Any) -> GrokDeploymentSpec:
    """Validate a whole GrokDeployment object (apiVersion, kind, metadata.name, spec)."""
    if not isinstance(body, dict):
        raise SpecError(f"a GrokDeployment must be a mapping, got {type(body).__name__}")
    expected = f"{API_GROUP}/{API_VERSION}"
    if body.get("apiVersion") != expected or body.get("kind") != KIND:
        raise SpecError(
            f"expected apiVersion {expected} and kind {KIND}, got "
            f"{body.get('apiVersion')!r} and {body.get('kind')!r}"
        )
    check_name((body.get("metadata") or {}).get("name"))
    return parse_spec(body.get("spec"))
