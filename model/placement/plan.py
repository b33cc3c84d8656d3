"""The plan's types: a cluster shape, parallelism degrees, shards of heads and experts, memory per
rank, and the Plan that holds them (validated on construction)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grokserve.model.config import GrokConfig
from grokserve.model.placement.checks import check_plan
from grokserve.model.placement.render import render_summary, render_table
from grokserve.model.placement.units import memory_size

# The dtypes load_model computes in: the spec defines float32 and bfloat16 execution only, so a plan
# for float16 would place a model that no loader can build.
DType = Literal["float32", "bfloat16"]
Quantization = Literal["int8"] | None

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2}


class PlacementError(ValueError):
    """A request that no plan can satisfy; the message says why and what would fit."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Cluster(_Frozen):
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=1)
    gpu_memory: int = Field(gt=0, description="bytes per GPU")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self, nodes: int | None = None) -> str:
        count = self.nodes if nodes is None else nodes
        noun = "node" if count == 1 else "nodes"
        return f"{count} {noun} of {self.gpus_per_node}×{memory_size(self.gpu_memory)}"


class Parallelism(_Frozen):
    tensor: int = Field(
        ge=1, description="attention ranks per group (kv heads split this many ways)"
    )
    expert: int = Field(ge=1, description="groups of whole experts; G / expert F slices per expert")


class Headroom(_Frozen):
    cache_tokens: int = Field(
        default=65536, ge=0, description="KV-cache tokens each rank must hold"
    )
    step_tokens: int | None = Field(
        default=None, ge=1, description="tokens in the largest step (default: the context length)"
    )
    reserve_fraction: float = Field(default=0.10, ge=0, lt=1)


class ExpertSlice(_Frozen):
    """Rows [f_start, f_stop) of expert `expert`'s hidden size, held by `replicas` ranks (this is `replica`)."""

    expert: int = Field(ge=0)
    f_start: int = Field(ge=0)
    f_stop: int = Field(gt=0)
    replica: int = Field(default=0, ge=0)
    replicas: int = Field(default=1, ge=1)

    @property
    def size(self) -> int:
        return self.f_stop - self.f_start


class Shard(_Frozen):
    """One rank's share of one layer: query and kv head ranges [start, stop) and expert slices."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    experts: tuple[ExpertSlice, ...]


class RankMemory(_Frozen):
    rank: int
    node: int
    local_rank: int
    weights: int
    kv_cache: int
    workspace: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.reserve


class Plan(_Frozen):
    config: GrokConfig
    cluster: Cluster
    parallelism: Parallelism
    dtype: DType
    quantization: Quantization = None
    headroom: Headroom = Headroom()
    layers: tuple[tuple[Shard, ...], ...] = Field(description="[layer][rank]")
    ranks: tuple[RankMemory, ...]
    notes: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        check_plan(self)
        return self

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    def shard(self, layer: int, rank: int) -> Shard:
        return self.layers[layer][rank]

    def attention_groups(self) -> list[list[int]]:
        """Ranks that sum their attention outputs: one list per (redundant) attention group."""
        size = self.parallelism.tensor
        return [list(range(start, start + size)) for start in range(0, self.world_size, size)]

    def fits(self) -> bool:
        return all(rank.total <= self.cluster.gpu_memory for rank in self.ranks)

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.model_validate_json(text)

    def table(self) -> str:
        return render_table(self)

    def summary(self) -> str:
        return render_summary(self)
