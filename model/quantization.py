"""The released 8-bit weight format: int8 matrices with bf16 scales per (row block, output column).

`W[..., r, c] = weight[..., r, c] · scales[..., r // (in / S), c]` (grok1-spec.md §3). The product of an
int8 and a bf16 value is exact in float32, so dequantising to float32 reproduces the matrix exactly.
"""

from __future__ import annotations

import torch
from torch import nn

# float32 elements dequantised per step (64 MiB): a Grok-1 expert stack is 1.6 G elements, and a float32
# copy of it beside the int8 source and the result would need 6 GiB of headroom.
DEQUANTIZE_CHUNK_ELEMENTS = 1 << 24


class QuantizedWeight(nn.Module):
    """A matrix (or stack of expert matrices) kept as int8 values and row-block bf16 scales."""

    # Registered as buffers in __init__; declared here so they type as tensors, not Tensor | Module.
    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        check_quantized_shapes(weight.shape, scales.shape)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def row_blocks(self) -> int:
        return self.scales.shape[-2]

    def dequantize(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return dequantize(self.weight, self.scales, dtype, device)


def dense(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The matrix in `dtype`: an int8 weight is dequantised in float32, then rounded once."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedWeight) else weight


def check_quantized_shapes(weight_shape: torch.Size, scales_shape: torch.Size) -> None:
    *lead, rows, cols = weight_shape
    *scale_lead, blocks, scale_cols = scales_shape
    if scale_lead != lead or scale_cols != cols or blocks < 1 or rows % blocks:
        raise ValueError(
            f"8-bit weight of shape {tuple(weight_shape)} cannot take scales of shape "
            f"{tuple(scales_shape)}: expected [..., S, {cols}] with S dividing {rows}"
        )


def dequantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk_elements: int = DEQUANTIZE_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The matrix in `dtype` on `device` (default: the weight's): each product is exact in float32,
    then rounded once. Rows go through float32 a chunk at a time, so besides the source and the result
    only one chunk's temporaries exist."""
    cols = weight.shape[-1]
    rows_per_block = weight.shape[-2] // scales.shape[-2]
    weight_rows = weight.reshape(-1, cols)
    scale_rows = scales.reshape(-1, cols)
    out = torch.empty(weight.shape, dtype=dtype, device=device or weight.device)
    out_rows = out.view(-1, cols)
    step = max(1, chunk_elements // cols)
    for start in range(0, weight_rows.shape[0], step):
        stop = min(start + step, weight_rows.shape[0])
        blocks = torch.arange(start, stop, device=weight.device) // rows_per_block
        out_rows[start:stop] = weight_rows[start:stop].float().mul_(scale_rows[blocks])
    return out


def quantize(matrix: torch.Tensor, blocks: int = 1) -> QuantizedWeight:
    """Symmetric absmax int8 quantisation with bf16 scales per (row block, column), as the release."""
    rows = matrix.shape[-2]
    if rows % blocks:
        raise ValueError(f"{blocks} row blocks do not divide {rows} rows")
    blocked = matrix.float().unflatten(-2, (blocks, rows // blocks))
    absmax = blocked.abs().amax(dim=-2).clamp_min(torch.finfo(torch.float32).tiny)
    scales = (absmax / 127).to(torch.bfloat16)
    values = torch.round(blocked / scales.float().unsqueeze(-2)).clamp(-128, 127)
    return QuantizedWeight(values.to(torch.int8).flatten(-3, -2), scales)
