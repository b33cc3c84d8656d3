"""Which rank holds which heads and expert slices: the default layout of a parallelism on a cluster."""

from __future__ import annotations

from collections.abc import Iterable

from grokserve.model.config import GrokConfig
from grokserve.model.placement.memory import rank_memory
from grokserve.model.placement.plan import (
    DTYPE_BYTES,
    Cluster,
    DType,
    ExpertSlice,
    Headroom,
    Parallelism,
    PlacementError,
    Plan,
    Quantization,
    Shard,
)
from grokserve.model.placement.render import compact


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


def layout(
    config: GrokConfig,
    parallelism: Parallelism | None,
    cluster: Cluster,
    dtype: DType,
    quantization: Quantization,
    headroom: Headroom,
) -> Plan:
    """The plan's shape and memory for a parallelism, whether or not it fits the GPUs."""
    parallelism, shards = layer_layout(config, parallelism, cluster, dtype, quantization)
    layers = tuple(tuple(shards) for _ in range(config.num_layers))
    ranks = tuple(
        rank_memory(config, cluster, dtype, quantization, headroom, layers, rank)
        for rank in range(cluster.world_size)
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


def fits(
    config: GrokConfig,
    parallelism: Parallelism | None,
    cluster: Cluster,
    dtype: DType,
    quantization: Quantization,
    headroom: Headroom,
) -> bool:
    """Whether the layout fits, without building (and validating) a Plan: the planner asks this
    for up to 64 node counts when it says what would fit."""
    try:
        _, shards = layer_layout(config, parallelism, cluster, dtype, quantization)
    except PlacementError:
        return False
    layers = [shards] * config.num_layers
    return all(
        rank_memory(config, cluster, dtype, quantization, headroom, layers, rank).total
        <= cluster.gpu_memory
        for rank in range(cluster.world_size)
    )


def layer_layout(
    config: GrokConfig,
    parallelism: Parallelism | None,
    cluster: Cluster,
    dtype: DType,
    quantization: Quantization,
) -> tuple[Parallelism, list[Shard]]:
    """The parallelism (the default one when None) and every rank's shard of one layer; every
    layer is laid out the same way."""
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
    return parallelism, shards


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
