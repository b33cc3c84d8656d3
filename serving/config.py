"""The serving configuration: one pydantic model for local runs and for the operator.

The operator renders this object (`ServingConfig.to_args()`) into the RayService's `serveConfigV2`
as the arguments of `grokserve.serving.app:build_app`, and `grokserve serve` builds it from command-line
flags. It is pure pydantic on purpose: the operator image has neither ray nor torch, so this module
must import neither.

Field names are snake_case in Python and camelCase on the wire (the same spelling as the
GrokDeployment custom resource); both spellings are accepted on input.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

PlacementStrategy = Literal["pack", "spread", "strict-spread"]

# Ray's names for our placement strategies (`placement_group_strategy` of a Serve deployment).
RAY_PLACEMENT_STRATEGIES: dict[str, str] = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict-spread": "STRICT_SPREAD",
}


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ModelSpec(_Spec):
    """Which model to serve and how to hold its weights."""

    preset: str = Field("grok-tiny", description="Architecture preset, e.g. grok-1, grok-mini.")
    source: str | None = Field(
        None,
        description="Checkpoint location: a local path or file:// URL; None serves random weights.",
    )
    tokenizer: str | None = Field(
        None,
        description="SentencePiece model: a local path or file:// URL; None uses the "
        "tokenizer.model beside the checkpoint, or byte-level tokens where there is none.",
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantization: Literal["none", "int8"] = "none"
    seed: int = Field(0, description="Seed for random weights (used only when source is None).")


class ParallelismSpec(_Spec):
    """How one model replica is spread over accelerators (its G shard workers)."""

    gpus_per_node: int = Field(1, ge=1, le=64)
    nodes_per_replica: int = Field(1, ge=1, le=64)
    tensor: int | None = Field(
        None,
        ge=1,
        description="Attention kv heads are split across this many shards; None lets the "
        "placement planner choose (as wide as the kv heads allow inside a node).",
    )
    expert: int | None = Field(
        None,
        ge=1,
        description="Groups of whole experts; None lets the planner choose (one group per node).",
    )
    placement: PlacementStrategy = "pack"

    @property
    def shards(self) -> int:
        """G: shard workers (and placement-group bundles) per replica."""
        return self.gpus_per_node * self.nodes_per_replica

    @model_validator(mode="after")
    def _degrees_divide_shards(self) -> ParallelismSpec:
        for field in ("tensor", "expert"):
            degree = getattr(self, field)
            if degree is not None and self.shards % degree:
                raise ValueError(
                    f"parallelism.{field}={degree} must divide the shards per replica "
                    f"(gpusPerNode × nodesPerReplica = {self.shards})"
                )
        return self

    @property
    def ray_strategy(self) -> str:
        return RAY_PLACEMENT_STRATEGIES[self.placement]


class ResourceSpec(_Spec):
    """What each shard worker asks Ray for (one placement-group bundle per shard)."""

    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Where each shard worker runs the model; 'cuda' needs a GPU visible to it "
        "(acceleratorResource GPU) and fails without one.",
    )
    cpus_per_shard: float = Field(1.0, gt=0)
    accelerator_resource: str | None = Field(
        None,
        description="Ray resource holding one accelerator per shard: 'GPU' on real clusters, a "
        "custom resource for simulated nodes, None on CPU-only machines.",
    )
    accelerator_memory_gb: float = Field(
        80.0, gt=0, description="Memory per accelerator, for the placement plan's fit check."
    )
    replica_cpus: float = Field(
        0.5, gt=0, description="CPUs of the replica actor (scheduler), placed in bundle 0."
    )

    def shard_bundle(self) -> dict[str, float]:
        bundle: dict[str, float] = {"CPU": self.cpus_per_shard}
        if self.accelerator_resource:
            bundle[self.accelerator_resource] = 1.0
        return bundle


class ServingLimits(_Spec):
    """Per-replica limits: batch, context, queue."""

    max_batch_size: int = Field(16, ge=1, le=4096, description="KV-cache slots per replica.")
    max_sequence_length: int = Field(
        512, ge=2, description="Prompt + generated tokens per request (the context limit)."
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Requests waiting for a slot; beyond this the API answers 429."
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=1,
        description="Paged KV-cache capacity in tokens (16-token blocks, shared prefixes); "
        "requests are admitted by the blocks of their prompts and preempted when blocks run out. "
        "None means: on CUDA, the memory the placement plan leaves after weights, workspace and "
        "reserve; on the CPU, maxBatchSize × maxSequenceLength.",
    )
    prefill_chunk_tokens: int = Field(
        256, ge=1, description="Prompt tokens per prefill step; longer prompts are chunked."
    )
    default_max_tokens: int = Field(
        64, ge=1, description="max_tokens when a request does not set it."
    )
    stream_interval_seconds: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Minimum time between a request's streamed messages after the first token "
        "(0: every step). Larger values send fewer, larger messages through Serve.",
    )

    @property
    def kv_budget(self) -> int:
        if self.kv_cache_tokens is not None:
            return self.kv_cache_tokens
        return self.max_batch_size * self.max_sequence_length


class ServingConfig(_Spec):
    """Everything `build_app` needs to deploy one served model."""

    name: str = Field(
        "grok",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Deployment name: the model id in the API and the `deployment` metric label.",
    )
    replicas: int = Field(1, ge=1, description="Model replicas (Serve replicas of GrokReplica).")
    model: ModelSpec = ModelSpec()
    parallelism: ParallelismSpec = ParallelismSpec()
    resources: ResourceSpec = ResourceSpec()
    serving: ServingLimits = ServingLimits()

    def to_args(self) -> dict[str, Any]:
        """The JSON-ready dict for serveConfigV2 `args` (camelCase keys)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServingConfig:
        return cls.model_validate(args)

    def placement_group_bundles(self) -> list[dict[str, float]]:
        """One bundle per shard; bundle 0 also holds the replica actor itself (Ray Serve places
        the replica in the first bundle), so the scheduler sits next to rank 0."""
        bundles = [self.resources.shard_bundle() for _ in range(self.parallelism.shards)]
        bundles[0] = {
            **bundles[0],
            "CPU": bundles[0]["CPU"] + self.resources.replica_cpus,
        }
        return bundles
