"""Tile shapes for the fused MoE kernels per token-count bucket (Hopper: H100 / H200).

NOT TUNED ON A GPU: no GPU was available while this was written. The table holds reasoned starting
points for D 6144, F 32768, 8 experts, top-2 (decode buckets: the smallest row block and many narrow
column tiles so that every SM streams weights; prefill buckets: wide tiles for tensor-core reuse),
to be replaced by the sweep in `bench/moe.py --sweep` on an H100/H200. What was checked without a GPU
(`python -m grokserve.model.kernels.hopper_check`, sm_90 machine code): every entry compiles with no
local-memory spills, 16-byte cp.async for the bf16 tiles, and HGMMA from 64 rows up (HMMA below).
BLOCK_K 256 at 16 rows spilled in the int8 gate_up kernel (two accumulators plus the dequantised tile),
hence 128 for the decode buckets.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class MoeTileConfig:
    block_m: int
    gate_up_block_n: int
    gate_up_block_k: int
    gate_up_warps: int
    gate_up_stages: int
    down_block_n: int
    down_block_k: int
    down_warps: int
    down_stages: int
    group_m: int = 8


# Keyed by the largest token count the entry is meant for.
HOPPER_CONFIGS: dict[int, MoeTileConfig] = {
    1: MoeTileConfig(16, 64, 128, 4, 4, 64, 128, 4, 4, group_m=1),
    8: MoeTileConfig(16, 64, 128, 4, 4, 64, 128, 4, 4, group_m=1),
    64: MoeTileConfig(16, 64, 128, 4, 4, 64, 128, 4, 4, group_m=1),
    256: MoeTileConfig(64, 64, 64, 4, 4, 64, 64, 4, 4),
    1024: MoeTileConfig(64, 128, 64, 8, 4, 128, 64, 8, 4),
    4096: MoeTileConfig(128, 128, 64, 8, 3, 128, 64, 8, 3),
    16384: MoeTileConfig(128, 128, 64, 8, 3, 128, 64, 8, 3),
}
_BUCKETS = sorted(HOPPER_CONFIGS)


def pick_config(num_tokens: int) -> MoeTileConfig:
    """The entry of the smallest bucket holding `num_tokens` (the largest bucket beyond them)."""
    index = min(bisect.bisect_left(_BUCKETS, num_tokens), len(_BUCKETS) - 1)
    return HOPPER_CONFIGS[_BUCKETS[index]]
