"""Key/value cache: per layer `k, v: [B, T_max, H_kv, K]` plus each row's filled length (spec §4).

Rows are independent slots: a serving scheduler appends to some rows while others wait, and empties a
row with `reset` when its sequence ends. Keys are stored after RoPE; pad tokens are remembered so that
they stay masked as keys.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """Appending would write past a row's capacity."""


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        kv_heads: int,
        key_size: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, max_len, kv_heads, key_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]

    def all_rows(self) -> torch.Tensor:
        return torch.arange(self.batch_size, device=self.lengths.device)

    def reset(self, rows: torch.Tensor | list[int]) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths[rows] = 0
        self.key_valid[rows] = False

    def begin_append(self, rows: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """Reserves room for `key_valid.shape[1]` new tokens per row; returns their positions [b, T]."""
        steps = key_valid.shape[1]
        start = self.lengths[rows]
        if int(start.max()) + steps > self.max_len:
            raise CacheFullError(
                f"appending {steps} token(s) to a cache row holding {int(start.max())} of "
                f"{self.max_len} exceeds its capacity"
            )
        positions = start[:, None] + torch.arange(steps, device=start.device)
        self.key_valid[rows[:, None], positions] = key_valid
        return positions

    def visible_keys(self, rows: torch.Tensor, span: int) -> torch.Tensor:
        return self.key_valid[rows, :span]

    def write(
        self,
        layer: int,
        rows: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the layer's new keys and values; returns the rows' first `span` keys and values."""
        self.keys[layer][rows[:, None], positions] = k
        self.values[layer][rows[:, None], positions] = v
        return self.keys[layer][rows, :span], self.values[layer][rows, :span]

    def end_append(self, rows: torch.Tensor, steps: int) -> None:
        self.lengths[rows] += steps
