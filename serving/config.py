"""The serving configuration: one pydantic model for local runs and for the operator.

The operator builds this object from a GrokDeployment (`grokserve.operator.replica`), plans it with
`ServingConfig.plan` and renders `ServingConfig.to_args()` into the RayService's `serveConfigV2` as
the arguments of `grokserve.serving.app:build_app`; `grokserve serve` builds it from command-line
flags. The operator image has neither ray nor torch, so this module imports neither (the model's
config, presets and planner need no torch).

Field names are snake_case in Python and camelCase on the wire (the same spelling as the
GrokDeployment custom resource); both spellings are accepted on input.
"""

from __future__ import annotations

import os
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from grokserve.model.config import GrokConfig
from grokserve.model.placement import (
    Cluster,
    DoesNotFitError,
    Headroom,
    Parallelism,
    Plan,
    Quantization,
    default_parallelism,
    make_plan,
    parse_memory,
)

# The Serve deployment of the model replicas (its options carry the replica count).
REPLICA_DEPLOYMENT = "GrokReplica"
# Serve's router must never hold a request waiting for a replica's "capacity": the scheduler is
# the only queue, and it answers admitted-or-429 at once. So a replica accepts far more calls at a
# time than its scheduler admits (the excess are answered with 429 within milliseconds), and the
# router's own queue only holds what is being routed right now.
CALLS_PER_REPLICA = 10_000
# Set where Serve's HTTP proxies start (every Ray node): each proxy then answers the 429s the
# replicas would give while they are known full (`grokserve.serving.proxy_gate`).
PROXY_ENVIRONMENT = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "grokserve.serving.proxy_gate:middlewares"
}


def proxy_gate_installed() -> bool:
    """Whether this process's node started its Serve proxy with PROXY_ENVIRONMENT (Ray's processes
    inherit the node's environment). Without the gate in front, the ingress neither tells clients
    the capacity nor believes a refusal report, which only that gate may send."""
    return all(os.environ.get(key) == value for key, value in PROXY_ENVIRONMENT.items())


Strategy = Literal["pack", "spread", "strict-spread"]

# Ray's names for our strategies (`placement_group_strategy` of a Serve deployment).
RAY_STRATEGIES: dict[str, str] = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict-spread": "STRICT_SPREAD",
}


class ReplicaCountOptions(TypedDict):
    """`ServingConfig.replica_count_options`: Serve deployment options, by their Serve names."""

    num_replicas: Literal["auto"]
    autoscaling_config: dict[str, int]
    max_queued_requests: int


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ReplicaModel(_Section):
    """Which model to serve and how to hold its weights."""

    preset: str = Field("grok-tiny", description="Architecture preset, e.g. grok-1, grok-mini.")
    source: str | None = Field(
        None,
        description="Checkpoint location: a local path, file://, s3://BUCKET/PREFIX, "
        "gs://BUCKET/PREFIX or hf://ORG/REPO[@REVISION][/SUBDIR]; None serves random weights.",
    )
    tokenizer: str | None = Field(
        None,
        description="SentencePiece model, same locations as source; None uses the "
        "tokenizer.model beside the checkpoint, or byte-level tokens where there is none.",
    )
    cache_dir: str | None = Field(
        None,
        description="Node-local cache of s3://, gs:// and hf:// weights, shared by the ranks on a "
        "node; None is ~/.cache/grokserve.",
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantization: Literal["none", "int8"] = "none"
    seed: int = Field(0, description="Seed for random weights (used only when source is None).")


class ReplicaParallelism(_Section):
    """How one model replica is spread over accelerators (its G shard workers)."""

    gpus_per_node: int = Field(1, ge=1, le=64)
    nodes_per_replica: int = Field(1, ge=1, le=64)
    gpu_memory: str = Field(
        "80Gi",
        description="Memory of one accelerator with its unit (80Gi, 141G): the plan's fit check.",
    )
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
    strategy: Strategy = Field(
        "pack", description="Ray placement-group strategy of the shards over the nodes."
    )

    @property
    def shards(self) -> int:
        """G: shard workers (and placement-group bundles) per replica."""
        return self.gpus_per_node * self.nodes_per_replica

    @field_validator("gpu_memory")
    @classmethod
    def _a_size(cls, value: str) -> str:
        parse_memory(value, "parallelism.gpuMemory")
        return value

    @property
    def gpu_memory_bytes(self) -> int:
        return parse_memory(self.gpu_memory, "parallelism.gpuMemory")

    @property
    def ray_strategy(self) -> str:
        return RAY_STRATEGIES[self.strategy]


class ReplicaResources(_Section):
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
    replica_cpus: float = Field(
        0.5, gt=0, description="CPUs of the replica actor (scheduler), placed in bundle 0."
    )

    def shard_bundle(self) -> dict[str, float]:
        bundle: dict[str, float] = {"CPU": self.cpus_per_shard}
        if self.accelerator_resource:
            bundle[self.accelerator_resource] = 1.0
        return bundle


class ServingLimits(_Section):
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
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body the API reads; a larger one is refused with 413.",
    )
    max_request_bytes_in_flight: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Request-body bytes one ingress replica holds at once (being read or not yet "
        "answered); a body that would pass it is refused with 503 + Retry-After. At least "
        "maxRequestBytes.",
    )
    stream_interval_seconds: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Minimum time between a request's streamed messages after the first token "
        "(0: every step). Larger values send fewer, larger messages through Serve.",
    )

    @model_validator(mode="after")
    def _budget_holds_one_body(self) -> ServingLimits:
        if self.max_request_bytes_in_flight < self.max_request_bytes:
            raise ValueError(
                f"serving.maxRequestBytesInFlight ({self.max_request_bytes_in_flight}) is below "
                f"serving.maxRequestBytes ({self.max_request_bytes}): no body of the largest "
                "allowed size could be read; raise it or lower maxRequestBytes"
            )
        return self

    @property
    def kv_budget(self) -> int:
        if self.kv_cache_tokens is not None:
            return self.kv_cache_tokens
        return self.max_batch_size * self.max_sequence_length


class ServingConfig(_Section):
    """Everything `build_app` needs to deploy one served model."""

    name: str = Field(
        "grok",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Deployment name: the model id in the API and the `deployment` metric label.",
    )
    replicas: int = Field(
        1,
        ge=0,
        description="Model replicas (Serve replicas of GrokReplica); at 0 the API still answers "
        "(503 scaled_to_zero) and counts the refused requests as waiting.",
    )
    model: ReplicaModel = ReplicaModel()
    parallelism: ReplicaParallelism = ReplicaParallelism()
    resources: ReplicaResources = ReplicaResources()
    serving: ServingLimits = ServingLimits()

    def to_args(self) -> dict[str, Any]:
        """The JSON-ready dict for serveConfigV2 `args` (camelCase keys)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServingConfig:
        return cls.model_validate(args)

    def replica_count_options(self) -> ReplicaCountOptions:
        """The options of the GrokReplica deployment that follow the replica count.

        Both are options Serve changes without restarting a replica, which is why the operator
        sends them as the application's deployment options rather than in its args (Serve hashes
        the args into the application's code version, and a new code version restarts every
        replica).

        The count is Serve autoscaling bounds that pin it (min = initial = max = replicas; a
        change of bounds sets the count at once), not `num_replicas`, for zero: Serve refuses
        `num_replicas: 0`, and bounds 0..1 starting at 0 run no model replica while the API
        ingress and MetricsHub keep running, so the endpoint answers at zero. Serve's own
        autoscaler adds none there (only requests sent to a deployment at zero would make it):
        the ingress answers them 503 `scaled_to_zero` instead and counts them as waiting, and the
        grokserve operator's autoscaler wakes the deployment by writing a count. Bounds at every
        count, not only at zero: Serve's code version of the application hashes which
        deployments have autoscaling bounds, and a new code version restarts every replica.
        """
        return {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": self.replicas,
                "initial_replicas": self.replicas,
                # Serve's least maximum is 1.
                "max_replicas": max(self.replicas, 1),
            },
            "max_queued_requests": max(self.replicas, 1) * CALLS_PER_REPLICA,
        }

    def degrees(self, model: GrokConfig) -> Parallelism:
        """tensor and expert, each the planner's choice where the config leaves it out."""
        default = default_parallelism(model, self.cluster())
        return Parallelism(
            tensor=self.parallelism.tensor or default.tensor,
            expert=self.parallelism.expert or default.expert,
        )

    def resolved(self, model: GrokConfig) -> ServingConfig:
        """This config with the degrees the planner chooses written in, so that the replica runs
        the parallelism that was planned."""
        degrees = self.degrees(model)
        parallelism = self.parallelism.model_copy(
            update={"tensor": degrees.tensor, "expert": degrees.expert}
        )
        return self.model_copy(update={"parallelism": parallelism})

    def plan(self, model: GrokConfig) -> Plan:
        """Which rank of a replica holds which heads and experts, and whether they fit the GPUs
        with these serving limits; raises PlacementError (DoesNotFitError naming the limits to
        change when the layout is valid but too big)."""
        limits = self.serving
        if self.cache_from_memory:  # the cache takes what is left; it must hold one sequence
            cache, cached = limits.max_sequence_length, "one serving.maxSequenceLength"
        elif limits.kv_cache_tokens is not None:
            cache, cached = limits.kv_cache_tokens, "serving.kvCacheTokens"
        else:
            cache, cached = limits.kv_budget, "serving.maxBatchSize × serving.maxSequenceLength"
        headroom = Headroom(
            cache_tokens=cache, step_tokens=limits.max_batch_size * limits.prefill_chunk_tokens
        )
        quantization: Quantization = "int8" if self.model.quantization == "int8" else None
        try:
            return make_plan(
                model, self.degrees(model), self.cluster(), self.model.dtype, quantization, headroom
            )
        except DoesNotFitError as error:
            int8 = "" if quantization else ", keep int8 weights (model.quantization)"
            raise DoesNotFitError(
                f"{error}. Each GPU caches its kv heads for {cached} = "
                f"{headroom.cache_tokens} tokens and computes steps "
                f"of up to {headroom.step_tokens} tokens: lower those, add GPUs "
                f"(parallelism.nodesPerReplica){int8}, or state larger GPUs "
                "(parallelism.gpuMemory)"
            ) from None

    @property
    def cache_from_memory(self) -> bool:
        """The KV cache is sized from the GPU memory the plan leaves (no kvCacheTokens, CUDA)."""
        return self.serving.kv_cache_tokens is None and self.resources.device == "cuda"

    def cluster(self) -> Cluster:
        """One replica's accelerators as the planner sees them."""
        return Cluster(
            nodes=self.parallelism.nodes_per_replica,
            gpus_per_node=self.parallelism.gpus_per_node,
            gpu_memory=self.parallelism.gpu_memory_bytes,
        )

    def placement_group_bundles(self) -> list[dict[str, float]]:
        """One bundle per shard; bundle 0 also holds the replica actor itself (Ray Serve places
        the replica in the first bundle), so the scheduler sits next to rank 0."""
        bundles = [self.resources.shard_bundle() for _ in range(self.parallelism.shards)]
        bundles[0] = {
            **bundles[0],
            "CPU": bundles[0]["CPU"] + self.resources.replica_cpus,
        }
        return bundles
