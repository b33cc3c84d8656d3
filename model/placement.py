"""Where each part of one model instance lives: a pure, serialisable placement plan (no torch, no weights).

A replica of G = nodes × GPUs-per-node ranks executes SPMD: every rank holds the same token activations.

- **Attention** is split over `tensor` ranks by kv head, each with its query heads (query head h reads kv
  head h // (Hq / Hkv)), so `tensor` divides `num_kv_heads`. Ranks `r` with the same `r // tensor` form
  one attention group; when G > tensor the G / tensor groups compute the same attention redundantly.
  Groups are runs of consecutive ranks, so they stay inside a node when `tensor` divides GPUs per node.
- **Experts** are split over `expert` groups of whole experts (expert parallelism), and each expert is
  sliced along its hidden size F over the G / `expert` ranks of its group (the reference's own sharding).
  Groups are runs of consecutive ranks too: with `expert` = number of nodes (the default) every expert
  lives inside one node, so a token's expert work never crosses nodes; the MoE outputs of all G ranks are
  summed (all-reduce).
- A shard may hold a **replicated** expert slice (`replicas` > 1, for hot experts); the holders then
  split that slice's tokens. The default planner does not replicate.

Memory per rank = weights + KV cache + workspace + reserve (`Headroom`, the fit rule):
- KV cache: `cache_tokens` tokens of the rank's kv heads in every layer (k and v, compute dtype);
- workspace: the logits of one step of `step_tokens` tokens (compute dtype and float32 copies), plus, with
  int8 weights, one layer's local matrices dequantised to the compute dtype;
- reserve: `reserve_fraction` of the GPU for the CUDA context, communication buffers and fragmentation.
A plan fits when every rank's total is at most the GPU memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grokserve.model.config import GrokConfig

# The dtypes load_model computes in: the spec defines float32 and bfloat16 execution only, so a plan
# for float16 would place a model that no loader can build.
DType = Literal["float32", "bfloat16"]
Quantization = Literal["int8"] | None

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2}
# Row blocks of the released 8-bit scales (grok1-spec.md §3): 8 for the row-parallel matrices.
INT8_ROW_BLOCKS = 8
SCALE_BYTES = 2  # the scales are bfloat16
GB = 10**9
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|b|kb|mb|gb|tb|kib|mib|gib|tib|k|m|g|t)\s*$", re.I)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class PlacementError(ValueError):
    """A request that no plan can satisfy; the message says why and what would fit."""


def parse_memory(text: str | int) -> int:
    """Bytes from "80GB" (decimal units), "80GiB" (binary units) or a plain byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _MEMORY.match(str(text))
        if not match:
            raise PlacementError(
                f"GPU memory {text!r} is not a size such as 80GB, 80GiB or 85899345920"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise PlacementError(f"GPU memory must be positive, got {text!r}")
    return value


def gigabytes(size: int) -> str:
    return f"{size / GB:.1f} GB"


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
        return f"{count} {noun} of {self.gpus_per_node}×{self.gpu_memory / GB:g} GB"


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


# -- building a plan ------------------------------------------------------------------------------


def default_parallelism(config: GrokConfig, cluster: Cluster) -> Parallelism:
    """Attention split as widely as the kv heads allow inside a node; one expert group per node.

    One expert group per node keeps each expert (all its F slices) inside a node; when the node count
    does not divide the expert count, experts are sliced across all ranks instead (and cross nodes).
    """
    tensor = max(
        d
        for d in range(1, config.num_kv_heads + 1)
        if config.num_kv_heads % d == 0 and cluster.gpus_per_node % d == 0
    )
    expert = cluster.nodes if config.num_experts % cluster.nodes == 0 else 1
    return Parallelism(tensor=tensor, expert=expert)


def make_plan(
    config: GrokConfig,
    parallelism: Parallelism | None,
    cluster: Cluster,
    dtype: DType = "bfloat16",
    quantization: Quantization = None,
    headroom: Headroom | None = None,
) -> Plan:
    """The placement of `config` on `cluster`; raises PlacementError (saying what would fit) if it cannot."""
    plan = layout(config, parallelism, cluster, dtype, quantization, headroom or Headroom())
    if not plan.fits():
        raise PlacementError(does_not_fit_message(plan))
    return plan


def layout(
    config: GrokConfig,
    parallelism: Parallelism | None,
    cluster: Cluster,
    dtype: DType,
    quantization: Quantization,
    headroom: Headroom,
) -> Plan:
    """The plan's shape and memory for a parallelism, whether or not it fits the GPUs."""
    if dtype not in DTYPE_BYTES:
        raise PlacementError(
            f"dtype must be one of {', '.join(DTYPE_BYTES)} (the dtypes the model loads in), "
            f"got {dtype!r}"
        )
    if quantization not in (None, "int8"):
        raise PlacementError(f"quantization must be int8 or none, got {quantization!r}")
    parallelism = parallelism or default_parallelism(config, cluster)
    check_parallelism(config, parallelism, cluster)
    world = cluster.world_size
    tensor, expert = parallelism.tensor, parallelism.expert
    kv_per_rank = config.num_kv_heads // tensor
    q_per_kv = config.q_heads_per_kv_head
    experts_per_group = config.num_experts // expert
    slices = world // expert
    f_slice = config.ffn_size // slices
    shards = []
    for rank in range(world):
        head_group, expert_group, f_index = rank % tensor, rank // slices, rank % slices
        kv = (head_group * kv_per_rank, (head_group + 1) * kv_per_rank)
        first = expert_group * experts_per_group
        held = tuple(
            ExpertSlice(expert=e, f_start=f_index * f_slice, f_stop=(f_index + 1) * f_slice)
            for e in range(first, first + experts_per_group)
        )
        shards.append(
            Shard(q_heads=(kv[0] * q_per_kv, kv[1] * q_per_kv), kv_heads=kv, experts=held)
        )
    layers = tuple(tuple(shards) for _ in range(config.num_layers))
    ranks = tuple(
        rank_memory(config, cluster, dtype, quantization, headroom, layers, rank)
        for rank in range(world)
    )
    return Plan(
        config=config,
        cluster=cluster,
        parallelism=parallelism,
        dtype=dtype,
        quantization=quantization,
        headroom=headroom,
        layers=layers,
        ranks=ranks,
        notes=tuple(placement_notes(config, parallelism, cluster, shards)),
    )


def check_parallelism(config: GrokConfig, parallelism: Parallelism, cluster: Cluster) -> None:
    world, tensor, expert = cluster.world_size, parallelism.tensor, parallelism.expert
    problems = []
    if config.num_kv_heads % tensor:
        problems.append(
            f"tensor {tensor} must divide the {config.num_kv_heads} kv heads "
            "(each rank holds whole kv heads with their query heads)"
        )
    if world % tensor:
        problems.append(f"tensor {tensor} must divide the {world} GPUs")
    if config.num_experts % expert:
        problems.append(f"expert {expert} must divide the {config.num_experts} experts")
    if world % expert:
        problems.append(f"expert {expert} must divide the {world} GPUs")
    elif config.ffn_size % (world // expert):
        problems.append(
            f"{world // expert} F slices per expert must divide the expert hidden size "
            f"{config.ffn_size}"
        )
    if problems:
        raise PlacementError(f"cannot place on {cluster.describe()}: " + "; ".join(problems))


def placement_notes(
    config: GrokConfig, parallelism: Parallelism, cluster: Cluster, shards: list[Shard]
) -> Iterable[str]:
    gpn = cluster.gpus_per_node
    if cluster.world_size > parallelism.tensor:
        yield (
            f"attention: {cluster.world_size // parallelism.tensor} groups of {parallelism.tensor} "
            "rank(s) compute the same heads"
        )
    if parallelism.tensor > gpn or gpn % parallelism.tensor:
        yield "attention groups span nodes: every attention all-reduce crosses nodes"
    for node in range(cluster.nodes):
        held = sorted(
            {s.expert for shard in shards[node * gpn : (node + 1) * gpn] for s in shard.experts}
        )
        yield f"node {node} holds experts {compact(held)}"
    slices = cluster.world_size // parallelism.expert
    if slices > gpn or gpn % slices:
        yield "experts span nodes: tokens routed to them need ranks on several nodes"


def compact(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


# -- memory ---------------------------------------------------------------------------------------


def matrix_bytes(
    rows: int, cols: int, dtype: DType, quantization: Quantization, row_blocks: int = 1
) -> int:
    if quantization == "int8":
        return rows * cols + row_blocks * cols * SCALE_BYTES
    return rows * cols * DTYPE_BYTES[dtype]


def sliced_row_blocks(rows: int, start: int, stop: int, blocks: int = INT8_ROW_BLOCKS) -> int:
    """Scale blocks left in rows [start, stop) of a matrix with `blocks` row blocks.

    A slice that starts or stops inside a block gets finer blocks, each repeating its old block's
    scale (the unit is the largest row count dividing the block size and both bounds).
    """
    unit = math.gcd(rows // blocks, start, stop)
    return (stop - start) // unit


def shard_weight_bytes(
    config: GrokConfig, shard: Shard, dtype: DType, quantization: Quantization
) -> tuple[int, int]:
    """(bytes held, elements of the layer's local matrices) for one layer's shard."""
    d, k = config.emb_size, config.key_size
    q = (shard.q_heads[1] - shard.q_heads[0]) * k
    kv = (shard.kv_heads[1] - shard.kv_heads[0]) * k
    q_rows = (shard.q_heads[0] * k, shard.q_heads[1] * k)
    wo_blocks = sliced_row_blocks(config.num_q_heads * k, *q_rows)
    size = (
        matrix_bytes(d, q, dtype, quantization)
        + 2 * matrix_bytes(d, kv, dtype, quantization)
        + matrix_bytes(q, d, dtype, quantization, wo_blocks)
    )
    elements = 2 * d * q + 2 * d * kv
    for piece in shard.experts:
        f = piece.size
        down_blocks = sliced_row_blocks(config.ffn_size, piece.f_start, piece.f_stop)
        size += 2 * matrix_bytes(d, f, dtype, quantization)
        size += matrix_bytes(f, d, dtype, quantization, down_blocks)
        elements += 3 * d * f
    norms_and_router = 4 * d * 4 + d * config.num_experts * 4
    return size + norms_and_router, elements


def rank_memory(
    config: GrokConfig,
    cluster: Cluster,
    dtype: DType,
    quantization: Quantization,
    headroom: Headroom,
    layers: tuple[tuple[Shard, ...], ...],
    rank: int,
) -> RankMemory:
    width = DTYPE_BYTES[dtype]
    embedding = config.vocab_size * config.emb_size * width + config.emb_size * 4
    weights, largest_layer, cache_per_token = embedding, 0, 0
    for shards in layers:
        shard = shards[rank]
        size, elements = shard_weight_bytes(config, shard, dtype, quantization)
        weights += size
        largest_layer = max(largest_layer, elements)
        cache_per_token += 2 * (shard.kv_heads[1] - shard.kv_heads[0]) * config.key_size * width
    step_tokens = headroom.step_tokens or config.sequence_len
    workspace = step_tokens * config.vocab_size * (width + 4)
    if quantization == "int8":
        workspace += largest_layer * width
    return RankMemory(
        rank=rank,
        node=rank // cluster.gpus_per_node,
        local_rank=rank % cluster.gpus_per_node,
        weights=weights,
        kv_cache=headroom.cache_tokens * cache_per_token,
        workspace=workspace,
        reserve=int(cluster.gpu_memory * headroom.reserve_fraction),
    )


# -- refusal --------------------------------------------------------------------------------------


def does_not_fit_message(plan: Plan) -> str:
    worst = max(plan.ranks, key=lambda r: r.total)
    cluster, name = plan.cluster, model_name(plan.config)
    precision = "int8" if plan.quantization == "int8" else plan.dtype
    lines = [
        f"{name} in {precision} does not fit on {cluster.describe()} "
        f"(tensor {plan.parallelism.tensor}, expert {plan.parallelism.expert}): rank {worst.rank} "
        f"needs {gigabytes(worst.total)} (weights {gigabytes(worst.weights)} + KV cache "
        f"{gigabytes(worst.kv_cache)} + workspace {gigabytes(worst.workspace)} + reserve "
        f"{gigabytes(worst.reserve)}) of {gigabytes(cluster.gpu_memory)}"
    ]
    suggestions = []
    nodes = minimum_nodes(plan, plan.quantization)
    if nodes is not None and nodes > cluster.nodes:
        suggestions.append(f"needs ≥ {cluster.describe(nodes)} in {precision}")
    elif nodes is not None:
        suggestions.append(
            f"the default parallelism {default_parallelism(plan.config, cluster)} fits"
        )
    if plan.quantization is None:
        int8_nodes = minimum_nodes(plan, "int8")
        if int8_nodes is not None:
            noun = "node" if int8_nodes == 1 else "nodes"
            suggestions.append(f"{int8_nodes} {noun} fit{'s' if int8_nodes == 1 else ''} with int8")
    if not suggestions:
        suggestions.append("no number of such nodes up to 64 holds it; use GPUs with more memory")
    return "; ".join([lines[0], *suggestions])


def minimum_nodes(plan: Plan, quantization: Quantization, limit: int = 64) -> int | None:
    """The fewest nodes of the plan's kind that hold the model with the default parallelism."""
    for nodes in range(1, limit + 1):
        cluster = plan.cluster.model_copy(update={"nodes": nodes})
        try:
            candidate = layout(plan.config, None, cluster, plan.dtype, quantization, plan.headroom)
        except PlacementError:
            continue
        if candidate.fits():
            return nodes
    return None


def model_name(config: GrokConfig) -> str:
    from grokserve.model.presets import PRESETS

    return next((name for name, known in PRESETS.items() if known == config), "the model")


# -- validation -----------------------------------------------------------------------------------


def check_plan(plan: Plan) -> None:
    """Every layer covers every query/kv head once per attention group and every expert row once.

    Replicated slices count once: their `replicas` holders must agree on the slice and have distinct
    replica indices.
    """
    config, world = plan.config, plan.world_size
    if len(plan.layers) != config.num_layers:
        raise ValueError(f"plan has {len(plan.layers)} layers, the model {config.num_layers}")
    if len(plan.ranks) != world:
        raise ValueError(f"plan has memory for {len(plan.ranks)} ranks, the cluster {world}")
    for index, shards in enumerate(plan.layers):
        if len(shards) != world:
            raise ValueError(f"layer {index} has {len(shards)} shards for {world} ranks")
        for group in plan.attention_groups():
            check_heads(config, [shards[r] for r in group], index)
        check_experts(config, shards, index)


def check_heads(config: GrokConfig, shards: list[Shard], layer: int) -> None:
    kv_covered = sorted(h for s in shards for h in range(*s.kv_heads))
    if kv_covered != list(range(config.num_kv_heads)):
        raise ValueError(f"layer {layer}: an attention group does not hold every kv head once")
    ratio = config.q_heads_per_kv_head
    for shard in shards:
        if shard.q_heads != (shard.kv_heads[0] * ratio, shard.kv_heads[1] * ratio):
            raise ValueError(
                f"layer {layer}: query heads {shard.q_heads} are not those of kv heads {shard.kv_heads}"
            )


def check_experts(config: GrokConfig, shards: tuple[Shard, ...], layer: int) -> None:
    rows: dict[int, list[tuple[int, int]]] = {e: [] for e in range(config.num_experts)}
    replicas: dict[tuple[int, int, int], set[int]] = {}
    for shard in shards:
        sizes = {piece.size for piece in shard.experts}
        if len(sizes) > 1:
            raise ValueError(
                f"layer {layer}: a rank's expert slices differ in size {sorted(sizes)}"
            )
        for piece in shard.experts:
            if piece.expert >= config.num_experts or piece.f_stop > config.ffn_size:
                raise ValueError(f"layer {layer}: {piece} lies outside the model")
            if piece.replica >= piece.replicas:
                raise ValueError(
                    f"layer {layer}: replica index {piece.replica} of {piece.replicas}"
                )
            key = (piece.expert, piece.f_start, piece.f_stop)
            holders = replicas.setdefault(key, set())
            if piece.replica in holders:
                raise ValueError(f"layer {layer}: {piece} is held twice")
            holders.add(piece.replica)
            if piece.replica == 0:
                rows[piece.expert].append((piece.f_start, piece.f_stop))
    for (expert, start, stop), holders in replicas.items():
        wanted = next(
            p.replicas
            for s in shards
            for p in s.experts
            if (p.expert, p.f_start, p.f_stop) == (expert, start, stop)
        )
        if holders != set(range(wanted)):
            raise ValueError(f"layer {layer}: expert {expert} rows {start}-{stop} miss a replica")
    for expert, spans in rows.items():
        position = 0
        for start, stop in sorted(spans):
            if start != position:
                raise ValueError(
                    f"layer {layer}: expert {expert} rows from {position} are not held exactly once"
                )
            position = stop
        if position != config.ffn_size:
            raise ValueError(f"layer {layer}: expert {expert} rows from {position} are not held")


# -- rendering ------------------------------------------------------------------------------------


def render_table(plan: Plan) -> str:
    """rank, node, heads, experts per layer, memory: one line per rank, then the notes."""
    header = ("rank", "node", "q heads", "kv heads", "experts per layer", "weights", "total")
    rows = []
    for memory in plan.ranks:
        layouts = {plan.shard(i, memory.rank) for i in range(len(plan.layers))}
        shard = plan.shard(0, memory.rank)
        experts = (
            describe_experts(shard, plan.config.ffn_size)
            if len(layouts) == 1
            else "varies by layer"
        )
        heads = (
            (compact(list(range(*shard.q_heads))), compact(list(range(*shard.kv_heads))))
            if len(layouts) == 1
            else ("varies", "varies")
        )
        rows.append(
            (
                str(memory.rank),
                str(memory.node),
                *heads,
                experts,
                gigabytes(memory.weights),
                gigabytes(memory.total),
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    precision = f"int8 weights, {plan.dtype} activations" if plan.quantization else plan.dtype
    title = (
        f"{model_name(plan.config)} on {plan.cluster.describe()} ({precision}); "
        f"tensor {plan.parallelism.tensor}, expert {plan.parallelism.expert}, "
        f"{plan.world_size // plan.parallelism.expert} F slice(s) per expert"
    )
    headroom = plan.headroom
    rule = (
        f"total = weights + KV cache ({headroom.cache_tokens} tokens) + workspace (a "
        f"{headroom.step_tokens or plan.config.sequence_len}-token step) + reserve "
        f"({headroom.reserve_fraction:.0%} of {gigabytes(plan.cluster.gpu_memory)})"
    )
    return "\n".join([title, *lines, rule, *(f"- {note}" for note in plan.notes)])


def describe_experts(shard: Shard, ffn_size: int) -> str:
    by_span: dict[tuple[int, int], list[int]] = {}
    for piece in shard.experts:
        by_span.setdefault((piece.f_start, piece.f_stop), []).append(piece.expert)
    parts = []
    for (start, stop), experts in by_span.items():
        span = "" if (start, stop) == (0, ffn_size) else f" F[{start}:{stop}]"
        parts.append(f"{compact(sorted(experts))}{span}")
    return "; ".join(parts)


def balance(plan: Plan) -> float:
    """Largest over smallest per-rank total, minus one (0.0 = perfectly balanced)."""
    totals = [rank.total for rank in plan.ranks]
    return max(totals) / min(totals) - 1 if min(totals) else math.inf
