"""Block accounting of the paged KV cache: a free list, reference counts and the prefix cache.

Pure Python (no torch), so that the serving scheduler can own it in a process without a model.
Block 0 is the null block: padding and unused block-table entries point at it, it is never handed
out, and `num_blocks` counts the usable blocks 1..num_blocks.

Prefix caching as vLLM does it: a full block is keyed by the hash of its tokens chained to its
parent's key, so equal keys mean equal whole prefixes. A sequence that ends (or is preempted) drops
its references; a full block with no references stays cached, on an LRU list, until a new sequence
reuses it or the free list runs dry and it is evicted. Hit and query counts are in tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

NULL_BLOCK = 0
DEFAULT_BLOCK_SIZE = 16  # tokens per block, as in vLLM


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class BlockTable:
    """One sequence's blocks, in order; `keys[i]` is block i's prefix key once that block is full."""

    blocks: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # leading tokens found in the prefix cache at allocation


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"the KV cache needs at least one block of at least one token, got {num_blocks} "
                f"block(s) of {block_size} token(s)"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * (num_blocks + 1)
        self._key_of: dict[int, int] = {}  # block -> prefix key (full, cached blocks only)
        self._by_key: dict[int, int] = {}  # prefix key -> block
        self._evictable: OrderedDict[int, None] = (
            OrderedDict()
        )  # unreferenced cached blocks, LRU first
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def available(self) -> int:
        """Blocks a new allocation can take: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def could_hold(self, tokens: int) -> bool:
        """Whether one sequence of `tokens` fits the whole pool."""
        return blocks_for(tokens, self.block_size) <= self.num_blocks

    def prefix_keys(self, tokens: Sequence[int]) -> list[int]:
        """The chained key of every full block of `tokens`."""
        keys, parent = [], 0
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            parent = hash((parent, tuple(tokens[start : start + size])))
            keys.append(parent)
        return keys

    def allocate(
        self, tokens: Sequence[int], total_tokens: int, shared: bool = True
    ) -> BlockTable | None:
        """Blocks for a sequence whose cache will hold `total_tokens`, starting with `tokens`:
        its leading full blocks from the prefix cache where present and `shared` (never the block
        of the last token, whose logits must be computed), new blocks for the rest. None when they
        do not fit (nothing changes then, and nothing is counted)."""
        table = BlockTable()
        shared = shared and self.prefix_caching
        if shared:
            for key in self.prefix_keys(tokens[:-1]):
                block = self._by_key.get(key)
                if block is None:
                    break
                table.blocks.append(block)
                table.keys.append(key)
        needed = blocks_for(total_tokens, self.block_size) - len(table.blocks)
        reusable = sum(1 for block in table.blocks if self._refs[block] == 0)
        if needed > self.available - reusable:
            return None
        for block in table.blocks:
            self._take(block)
        table.blocks.extend(self._new_block() for _ in range(needed))
        table.cached_tokens = len(table.keys) * self.block_size
        if shared:
            self.query_tokens += len(tokens)
            self.hit_tokens += table.cached_tokens
        return table

    def grow(self, table: BlockTable, total_tokens: int) -> bool:
        """Room for `total_tokens` in `table`; False (nothing taken) when the blocks run out."""
        needed = blocks_for(total_tokens, self.block_size) - len(table.blocks)
        if needed > self.available:
            return False
        table.blocks.extend(self._new_block() for _ in range(needed))
        return True

    def cache_full_blocks(self, table: BlockTable, tokens: Sequence[int]) -> None:
        """Publish the full blocks of `tokens` (the sequence's computed tokens) in the prefix cache."""
        if not self.prefix_caching:
            return
        keys = self.prefix_keys(tokens)
        for index in range(len(table.keys), len(keys)):
            key, block = keys[index], table.blocks[index]
            table.keys.append(key)
            if key not in self._by_key and block not in self._key_of:
                self._by_key[key] = block
                self._key_of[block] = key

    def free(self, table: BlockTable) -> None:
        """Drop the sequence's references; later blocks go first, so a prefix outlives its tail."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.blocks.clear()
        table.keys.clear()

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def _new_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
        self._refs[block] = 1
        return block
