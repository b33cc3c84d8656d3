"""Route-sorted, block-aligned token order for the fused MoE kernels, without host synchronisation.

Each (token, slot) pair routed to a local expert gets a row in a padded buffer where every expert's rows
start on a multiple of `block_m`, so that one program of `block_m` rows works for exactly one expert.
All sizes are upper bounds known from the shapes alone (no `.item()`), so the whole MoE call can be
captured in a CUDA graph for decode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockRouting:
    # [padded_rows] flat (token·top_k + slot) index of each row; `num_pairs` marks a padding row.
    sorted_pairs: torch.Tensor
    # [padded_rows // block_m] local expert of each row block; `num_local_experts` marks an unused block.
    block_expert: torch.Tensor
    num_pairs: int
    block_m: int

    @property
    def padded_rows(self) -> int:
        return self.sorted_pairs.shape[0]


def padded_row_bound(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """Most rows the padded order can need: every expert may waste up to block_m - 1 rows."""
    rows = num_pairs + num_local_experts * (block_m - 1)
    return -(-rows // block_m) * block_m


@functools.lru_cache(maxsize=64)
def local_slot_table(expert_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[max id + 2] int64: the local slot (index in `expert_ids`) of each global expert id, -1 for the
    ids not held; the last entry stands for every larger id.

    Cached per shard, so that after the first call no host-to-device copy happens (a CUDA graph
    capture of decode allows none).
    """
    if len(set(expert_ids)) != len(expert_ids) or any(e < 0 for e in expert_ids):
        raise ValueError(f"expert ids must be distinct and non-negative, got {list(expert_ids)}")
    table = torch.full((max(expert_ids, default=-1) + 2,), -1, dtype=torch.int64)
    table[list(expert_ids)] = torch.arange(len(expert_ids))
    return table.to(device)


def align_routing(experts: torch.Tensor, expert_ids: Sequence[int], block_m: int) -> BlockRouting:
    """Sorts the (token, slot) pairs by local expert and pads each expert's run to `block_m` rows.

    experts: [N, k] global expert ids; expert_ids: the global ids of the local experts, in the order of
    the weight stacks (any order, any subset). Pairs routed elsewhere (another shard's experts) get
    no row.
    """
    device = experts.device
    num_local_experts = len(expert_ids)
    table = local_slot_table(tuple(expert_ids), device)
    flat = experts.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    slot = table[flat.clamp(0, table.shape[0] - 1)]
    local = slot >= 0
    key = torch.where(local, slot, num_local_experts)  # other shards' pairs sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_local_experts]
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0)
    padded_starts = padded_ends - padded_counts
    starts = torch.cumsum(counts, 0) - counts

    rows = padded_row_bound(num_pairs, num_local_experts, block_m)
    sorted_key = key[order]
    local_sorted = sorted_key < num_local_experts
    expert_of = sorted_key.clamp(max=num_local_experts - 1)
    rank = torch.arange(num_pairs, device=device) - starts[expert_of]
    # Pairs that get no row are written to one scratch slot past the end, then cut off.
    destination = torch.where(local_sorted, padded_starts[expert_of] + rank, rows)
    sorted_pairs = torch.full((rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[destination] = order.to(torch.int32)
    block_starts = torch.arange(0, rows, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return BlockRouting(sorted_pairs[:rows], block_expert, num_pairs, block_m)
