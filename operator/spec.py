"""The GrokDeployment spec (grokserve.io/v1alpha1) as pydantic models.

This is the source of truth for the custom resource: the CRD's openAPIV3Schema is generated from
these models (`grokserve.operator.crd`), and the operator parses every object with `parse_spec`.
Cross-field rules live in one table (`RULES`) that gives both the CRD's CEL rules and the models'
checks; the presets come from the model package (`grokserve.model.presets`, which needs no torch).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from grokserve.model.config import GrokConfig
from grokserve.model.placement.units import parse_memory
from grokserve.model.presets import PRESETS, needs_source
from grokserve.operator.kube_formats import (
    CpuQuantity,
    DNS1123SubdomainName,
    ExtendedResourceName,
    ImageReference,
    LabelKey,
    LabelValue,
    MemoryQuantity,
)
from grokserve.operator.rules import Field as Ref
from grokserve.operator.rules import Lookup, Rule, failures, present

API_GROUP = "grokserve.io"
API_VERSION = "v1alpha1"
KIND = "GrokDeployment"
PLURAL = "grokdeployments"

# Children take the deployment's name (the Service needs a DNS-1035 label) and KubeRay derives
# longer names from the RayService's, so names are kept short enough for both.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 40
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
# pvc://CLAIM/PATH: the claim is also a volume name, `model-CLAIM`, a DNS-1123 label (≤ 63).
SOURCE_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]{0,55}[a-z0-9])?(/.*)?|file:///.*|(s3|gs|hf)://[^/].*)$"
)
URL_MAX_LENGTH = 2048
# Bounds of every list and map: kopf keeps the whole spec in one annotation (≤ 256 KiB).
MAX_TOLERATIONS = 32
MAX_NODE_SELECTOR = 32
# Kubernetes quantities of bytes with a unit (a bare number would be bytes, never what is meant).
MEMORY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)$"
# Names of Secrets and PersistentVolumeClaims: DNS-1123 subdomains.
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
OBJECT_NAME_MAX_LENGTH = 253


def _per_preset(what: str, label: str) -> Lookup:
    return Lookup(
        label,
        {name: getattr(config, what) for name, config in PRESETS.items()},
        Ref("model.preset"),
    )


def _listed(lookup: Lookup) -> str:
    return ", ".join(f"{name}: {value}" for name, value in lookup.table.items())


_KV_HEADS = _per_preset("num_kv_heads", "the model's kv heads")
_EXPERTS = _per_preset("num_experts", "the model's experts")
_CONTEXT = _per_preset("sequence_len", "the model's context")
_NEED_SOURCE = [name for name, config in PRESETS.items() if needs_source(config)]
_SHARDS = Ref("gpus_per_node") * Ref("nodes_per_replica")

# Every cross-field rule, once: `crd.py` renders them as CEL, the models below check them.
RULES = [
    Rule(
        "model",
        ~Ref("preset").one_of(_NEED_SOURCE) | present("source"),
        f"model.source is required for {', '.join(_NEED_SOURCE)}: random weights of that size "
        "serve nothing useful",
        field="source",
    ),
    Rule(
        "model.cache",
        Ref("type").one_of(["emptyDir"]) | ~present("size_limit"),
        "model.cache.sizeLimit applies to type emptyDir only",
        field="size_limit",
    ),
    Rule(
        "model.cache",
        Ref("type").one_of(["hostPath"]).equals(present("path")),
        "model.cache.path is required with type hostPath and applies to it only",
        field="path",
    ),
    Rule(
        "model.cache",
        Ref("type").one_of(["pvc"]).equals(present("claim")),
        "model.cache.claim is required with type pvc and applies to it only",
        field="claim",
    ),
    Rule(
        "parallelism",
        Ref("tensor").divides(_SHARDS),
        "parallelism.tensor must divide gpusPerNode × nodesPerReplica",
        field="tensor",
    ),
    Rule(
        "parallelism",
        Ref("expert").divides(_SHARDS),
        "parallelism.expert must divide gpusPerNode × nodesPerReplica",
        field="expert",
    ),
    Rule(
        "autoscaling",
        Ref("min_replicas") <= Ref("max_replicas"),
        "autoscaling.minReplicas must be ≤ autoscaling.maxReplicas",
        field="min_replicas",
    ),
    Rule(
        "autoscaling",
        ~Ref("enabled") | present("prometheus_url"),
        "autoscaling.prometheusUrl is required when autoscaling is enabled",
        field="prometheus_url",
    ),
    Rule(
        "autoscaling",
        (Ref("min_replicas") >= 1) | present("scale_to_zero_idle_seconds"),
        "autoscaling.minReplicas 0 needs autoscaling.scaleToZeroIdleSeconds (how long the "
        "deployment must be idle before it scales to zero)",
        field="min_replicas",
    ),
    Rule(
        "",
        Ref("parallelism.tensor").divides(_KV_HEADS),
        f"parallelism.tensor must divide the model's kv heads ({_listed(_KV_HEADS)})",
        field="parallelism.tensor",
    ),
    Rule(
        "",
        Ref("parallelism.expert").divides(_EXPERTS),
        f"parallelism.expert must divide the model's experts ({_listed(_EXPERTS)})",
        field="parallelism.expert",
    ),
    Rule(
        "",
        Ref("serving.max_sequence_length") <= _CONTEXT,
        f"serving.maxSequenceLength must not exceed the model's context ({_listed(_CONTEXT)})",
        field="serving.max_sequence_length",
    ),
    Rule(
        "",
        ~Ref("autoscaling.enabled")
        | (
            (Ref("replicas") >= Ref("autoscaling.min_replicas"))
            & (Ref("replicas") <= Ref("autoscaling.max_replicas"))
        ),
        "replicas must lie within autoscaling.minReplicas..maxReplicas while autoscaling is "
        "enabled",
        field="replicas",
    ),
]


class CamelModel(BaseModel):
    """snake_case in Python, camelCase in YAML (the custom resource's spelling); both accepted."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    # The RULES scope of this model ("" for the spec itself, None for models without rules).
    rule_scope: ClassVar[str | None] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> CamelModel:
        if self.rule_scope is not None:
            broken = failures(RULES, self.rule_scope, self)
            if broken:
                raise ValueError("; ".join(broken))
        return self


class SpecError(ValueError):
    """A GrokDeployment that cannot be deployed; `message` names the offending field(s)."""

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ModelCacheSpec(CamelModel):
    """Where the Ray pods keep s3://, gs:// and hf:// weights they fetch: one copy per node,
    shared by the ranks on it (mounted only when the source or tokenizer is remote)."""

    rule_scope: ClassVar[str | None] = "model.cache"

    type: Literal["emptyDir", "hostPath", "pvc"] = Field(
        "emptyDir",
        description="emptyDir: the pod's scratch disk, fetched again by every new pod; hostPath: a "
        "node directory that outlives pods (a warm cache); pvc: a claim (ReadWriteMany when pods "
        "on several nodes share it).",
    )
    size_limit: str | None = Field(
        None,
        pattern=MEMORY_PATTERN,
        max_length=20,
        description="emptyDir only: its size limit, e.g. 700Gi (the checkpoint, or a rank's share).",
    )
    path: str | None = Field(
        None, pattern=r"^/.*$", max_length=1024, description="hostPath only: the node directory."
    )
    claim: str | None = Field(
        None,
        pattern=OBJECT_NAME_PATTERN,
        max_length=OBJECT_NAME_MAX_LENGTH,
        description="pvc only: the claim's name.",
    )


class ModelSpec(CamelModel):
    """Which model to serve and how its weights are held on the GPUs."""

    rule_scope: ClassVar[str | None] = "model"

    preset: PresetName = Field(  # type: ignore[valid-type]
        description="Architecture preset; grok-1 is the released model."
    )
    source: str | None = Field(
        None,
        pattern=SOURCE_PATTERN,
        max_length=URL_MAX_LENGTH,
        description="Checkpoint location: pvc://CLAIM/PATH, file://PATH, s3://, gs:// or hf://. "
        "Unset serves random weights, which only the small presets allow (tests and demos).",
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
    cache: ModelCacheSpec = Field(
        default_factory=ModelCacheSpec,
        description="Node-local cache of s3://, gs:// and hf:// weights.",
    )
    credentials_secret: str | None = Field(
        None,
        pattern=OBJECT_NAME_PATTERN,
        max_length=OBJECT_NAME_MAX_LENGTH,
        description="Secret whose keys become environment variables of the Ray pods, e.g. "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, HF_TOKEN; unset: the pods' "
        "ServiceAccount (IRSA, Workload Identity) or public access.",
    )

    @property
    def config(self) -> GrokConfig:
        """The preset's configuration: what the operator plans with (a source's own config.json
        must describe the same model)."""
        return PRESETS[self.preset]


class ParallelismSpec(CamelModel):
    """How one model replica is spread over accelerators: G = gpusPerNode × nodesPerReplica shards."""

    rule_scope: ClassVar[str | None] = "parallelism"

    device: Literal["gpu", "cpu"] = Field(
        "gpu",
        description="gpu requests one GPU per shard; cpu runs shards on CPU (small models only).",
    )
    gpus_per_node: int = Field(
        8, ge=1, le=64, description="Shards (GPUs) each worker node of a replica contributes."
    )
    nodes_per_replica: int = Field(1, ge=1, le=64, description="Worker nodes one replica spans.")
    gpu_memory: str = Field(
        "80Gi",
        pattern=MEMORY_PATTERN,
        max_length=20,
        description="Memory of one GPU as a Kubernetes quantity (80Gi, 141Gi, 80G): the operator "
        "plans each replica against it and refuses a spec whose replica does not fit.",
    )
    tensor: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Attention kv heads are split across this many shards (divides the kv heads); "
        "unset lets the planner choose (as wide as the kv heads allow inside a node).",
    )
    expert: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Groups of whole experts (divides the experts); unset lets the planner "
        "choose (one group per node).",
    )
    strategy: Literal["pack", "spread", "strict-spread"] = Field(
        "pack",
        description="Ray placement-group strategy of a replica's shards over the worker nodes "
        "(PACK, SPREAD, STRICT_SPREAD); which shard holds what is the planner's placement.",
    )

    @property
    def shards(self) -> int:
        return self.gpus_per_node * self.nodes_per_replica

    @property
    def gpus_per_replica(self) -> int:
        return self.shards if self.device == "gpu" else 0

    @field_validator("gpu_memory")
    @classmethod
    def _positive_memory(cls, value: str) -> str:
        parse_memory(value, "parallelism.gpuMemory")  # the pattern cannot refuse 0Gi
        return value

    @property
    def gpu_memory_bytes(self) -> int:
        return parse_memory(self.gpu_memory, "parallelism.gpuMemory")


class AutoscalingSpec(CamelModel):
    """The built-in queue-based autoscaler; when enabled it is the only writer of spec.replicas."""

    rule_scope: ClassVar[str | None] = "autoscaling"

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
        description="Prometheus HTTP API base URL that scrapes this deployment's serving pods: "
        "the autoscaler's queue lengths (required when enabled) and, enabled or not, the weight "
        "loading progress in status.loading.",
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
                    "fieldPath": ".operator",
                },
                {
                    "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists must not have a value",
                    "fieldPath": ".value",
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
    idle_timeout_seconds: int = Field(
        60,
        ge=0,
        description="Seconds a worker node must be idle (no Serve replica on it) before Ray's "
        "autoscaler removes it and frees its GPUs. Changing it starts a new Ray cluster.",
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

    rule_scope: ClassVar[str | None] = ""

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

    @property
    def max_sequence_length(self) -> int:
        return self.serving.max_sequence_length or self.model.config.sequence_len


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
