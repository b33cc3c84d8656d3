"""Tile shapes for the fused MoE kernels (Hopper: H100 / H200), keyed by (experts per GPU, F, dtype, tokens).

A deployment's per-GPU expert shapes differ (8 experts × F/8 = 4096 under tensor parallelism, 1 expert ×
F = 32768 under expert parallelism, all 8 × 32768 on one GPU), and the best tiles differ with them, so
an entry is looked up by the expert stack's shape and weight dtype first, then by token count:

1. measured entries (`TileKey` -> config) for this (experts, F, dtype): the smallest token bucket
   holding the call's tokens (the largest bucket beyond them);
2. otherwise `HOPPER_CONFIGS`, reasoned per token bucket alone.

Measured entries come from the sweep in `bench/moe.py --sweep` (run by `bench/gpu_check.sh`), which
writes a JSON file of entries; `load_tile_table(path)` adds such a file, and so does setting
`GROKSERVE_MOE_TILES=path.json` before the first lookup. `moe_tiles.json` beside this module, if
present, is loaded first (the measured table shipped with the package).

`HOPPER_CONFIGS` is NOT TUNED ON A GPU: reasoned starting points for D 6144, F 32768, 8 experts,
top-2 (decode buckets: the smallest row block and many narrow column tiles so that every SM streams
weights; prefill buckets: wide tiles for tensor-core reuse). What was checked without a GPU
(`python -m grokserve.model.kernels.hopper_check`, sm_90 machine code): every entry compiles with no
local-memory spills, 16-byte cp.async for the bf16 tiles, and HGMMA from 64 rows up (HMMA below).
BLOCK_K 256 at 16 rows spilled in the int8 gate_up kernel (two accumulators plus the dequantised tile),
hence 128 for the decode buckets.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch

TILES_ENV = "GROKSERVE_MOE_TILES"
SHIPPED_TABLE = Path(__file__).with_name("moe_tiles.json")
# The weight dtypes the table distinguishes: the activations' dtype for dense weights, else int8.
WEIGHT_DTYPES = ("bf16", "fp16", "int8")


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


class TileKey(NamedTuple):
    experts: int  # experts in this GPU's stack
    ffn: int  # F of this GPU's slice
    dtype: str  # one of WEIGHT_DTYPES
    tokens: int  # the largest token count the entry is meant for


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

# Measured entries, filled from JSON (see the module docstring).
MEASURED_CONFIGS: dict[TileKey, MoeTileConfig] = {}


def weight_dtype_name(weight_dtype: torch.dtype) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}
    if weight_dtype not in names:
        raise ValueError(f"no MoE tile table for weights of dtype {weight_dtype}")
    return names[weight_dtype]


def _smallest_bucket_holding(buckets: list[int], num_tokens: int) -> int:
    index = min(bisect.bisect_left(buckets, num_tokens), len(buckets) - 1)
    return buckets[index]


def pick_config(
    num_tokens: int, experts: int | None = None, ffn: int | None = None, dtype: str | None = None
) -> MoeTileConfig:
    """The measured entry for this expert stack and token count, else the token-bucket default."""
    _load_default_tables()
    if experts is not None and ffn is not None and dtype is not None:
        buckets = sorted(
            key.tokens
            for key in MEASURED_CONFIGS
            if (key.experts, key.ffn, key.dtype) == (experts, ffn, dtype)
        )
        if buckets:
            tokens = _smallest_bucket_holding(buckets, num_tokens)
            return MEASURED_CONFIGS[TileKey(experts, ffn, dtype, tokens)]
    return HOPPER_CONFIGS[_smallest_bucket_holding(sorted(HOPPER_CONFIGS), num_tokens)]


def table_entry(key: TileKey, config: MoeTileConfig, **measured: object) -> dict:
    """One JSON entry of a tile table (what the sweep writes); extra fields (timings) are kept."""
    return {**key._asdict(), "config": asdict(config), **measured}


def parse_tile_table(entries: list[dict]) -> dict[TileKey, MoeTileConfig]:
    """Entries as `table_entry` writes them; names the entry and field at fault."""
    known = {f.name for f in fields(MoeTileConfig)}
    table = {}
    for index, entry in enumerate(entries):
        try:
            key = TileKey(
                int(entry["experts"]), int(entry["ffn"]), str(entry["dtype"]), int(entry["tokens"])
            )
            config = entry["config"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"tile table entry {index} needs {list(TileKey._fields)} and 'config': {error}"
            ) from None
        if key.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"tile table entry {index}: dtype must be one of {WEIGHT_DTYPES}")
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"tile table entry {index}: unknown config fields {sorted(unknown)}")
        table[key] = MoeTileConfig(**config)
    return table


def load_tile_table(path: str | Path) -> dict[TileKey, MoeTileConfig]:
    """Adds the entries of a sweep's JSON file (a list of `table_entry`s) to the measured table."""
    with open(path) as source:
        entries = json.load(source)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a tile table is a JSON list of entries")
    table = parse_tile_table(entries)
    MEASURED_CONFIGS.update(table)
    return table


@functools.cache
def _load_default_tables() -> None:
    if SHIPPED_TABLE.exists():
        load_tile_table(SHIPPED_TABLE)
    if os.environ.get(TILES_ENV):
        load_tile_table(os.environ[TILES_ENV])
