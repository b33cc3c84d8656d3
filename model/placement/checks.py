"""A plan's invariants: every layer holds every head once per attention group and every expert row
once (replicated slices counted once)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grokserve.model.config import GrokConfig

if TYPE_CHECKING:
    from grokserve.model.placement.plan import Plan, Shard


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
