"""Memory per rank = weights + KV cache + workspace + reserve (see the package's docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from grokserve.model.config import GrokConfig
from grokserve.model.placement.plan import (
    DTYPE_BYTES,
    Cluster,
    DType,
    Headroom,
    Quantization,
    RankMemory,
    Shard,
)

# Row blocks of the released 8-bit scales (grok1-spec.md §3): 8 for the row-parallel matrices.
INT8_ROW_BLOCKS = 8
SCALE_BYTES = 2  # the scales are bfloat16


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
    layers: Sequence[Sequence[Shard]],
    rank: int,
) -> RankMemory:
    width = DTYPE_BYTES[dtype]
    embedding = config.vocab_size * config.emb_size * width + config.emb_size * 4
    weights, largest_layer, cache_per_token = embedding, 0, 0
    # Layers usually share their shards: size each distinct shard once.
    sizes: dict[int, tuple[int, int]] = {}
    for shards in layers:
        shard = shards[rank]
        if id(shard) not in sizes:
            sizes[id(shard)] = shard_weight_bytes(config, shard, dtype, quantization)
        size, elements = sizes[id(shard)]
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
