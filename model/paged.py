"""Paged KV cache: per layer `keys, values: [num_blocks + 1, block_size, H_kv, K]`, block 0 the null block.

A sequence's tokens live in the blocks its block table lists (`grokserve.model.blocks` hands them out):
token at position p sits in block `table[p // block_size]`, offset `p % block_size`. Nothing here
depends on the values of the inputs for its shapes, so a step can be compiled and captured.
"""

from __future__ import annotations

import torch

from grokserve.model import layers
from grokserve.model.blocks import NULL_BLOCK


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        key_size: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        # One extra block: the null block (index 0) that padding writes into and never reads.
        shape = (num_blocks + 1, block_size, kv_heads, key_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks

    @property
    def device(self) -> torch.device:
        return self.keys[0].device


class PagedStep:
    """Where one step's tokens sit in a paged cache, with the interface `transformer.Step` has.

    tokens [B, T]; positions [B, T]: absolute, -1 where a row has fewer tokens than T (padding:
    written to the null block, outputs discarded); block_tables [B, max_blocks]; lengths [B]: each
    row's cached tokens after this step (keys at positions >= length are invisible).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
    ) -> None:
        self.cache = cache
        # Padding is marked by its position, not its id: a generated pad id is a real token.
        self.token_valid = positions >= 0
        positions = positions.clamp(min=0)
        self.positions = positions
        self.block_tables = block_tables
        size = cache.block_size
        block = block_tables.gather(1, torch.div(positions, size, rounding_mode="floor"))
        slots = block * size + positions % size
        self.slots = torch.where(self.token_valid, slots, NULL_BLOCK * size).reshape(-1)
        span = block_tables.shape[1] * size
        self.key_valid = torch.arange(span, device=tokens.device)[None, :] < lengths[:, None]

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        logit_multiplier: float,
        cap: float,
    ) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        heads, key_size = keys.shape[2:]
        keys.view(-1, heads, key_size).index_copy_(0, self.slots, k.reshape(-1, heads, key_size))
        values.view(-1, heads, key_size).index_copy_(0, self.slots, v.reshape(-1, heads, key_size))
        return paged_attention(
            q,
            keys,
            values,
            self.block_tables,
            self.positions,
            self.key_valid,
            logit_multiplier,
            cap,
        )


def paged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    query_positions: torch.Tensor,
    key_valid: torch.Tensor,
    logit_multiplier: float,
    cap: float,
) -> torch.Tensor:
    """`layers.attention` over the keys and values a block table lists: q [B, T, Hq, K], keys/values
    [blocks, block_size, Hkv, K], block_tables [B, max_blocks], key_valid [B, max_blocks·block_size].

    The blocks are gathered into one [B, S, Hkv, K] span per row (what the CPU needs for its batched
    matmuls); a GPU kernel that reads the blocks in place computes the same numbers."""
    batch, listed = block_tables.shape[0], block_tables.reshape(-1)
    # index_select copies whole blocks; advanced indexing (keys[block_tables]) is ~5x slower on the CPU.
    k = keys.index_select(0, listed).view(batch, -1, *keys.shape[2:])
    v = values.index_select(0, listed).view(batch, -1, *values.shape[2:])
    return layers.attention(q, k, v, query_positions, key_valid, logit_multiplier, cap)
