"""Which inputs the fused MoE kernel takes; anything else goes to the reference path."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from grokserve.model.quantization import QuantizedWeight

# tl.dot needs every tile side to be at least 16, so every reduced dimension (and every row block of
# the int8 scales) must be a multiple of 16.
TILE_QUANTUM = 16
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device | None = None) -> bool:
    """Triton can run here: on a CUDA device, or anywhere under its interpreter."""
    if not triton_importable():
        return False
    return triton_interpreting() or device is None or device.type == "cuda"


def rows_per_scale(weight: torch.Tensor | QuantizedWeight) -> int:
    """Rows of the input dimension that share one scale (the whole dimension for a dense weight)."""
    rows = weight.shape[-2]
    return rows // weight.row_blocks if isinstance(weight, QuantizedWeight) else rows


def fast_moe_supported(
    x: torch.Tensor,
    w_gate: torch.Tensor | QuantizedWeight,
    w_up: torch.Tensor | QuantizedWeight,
    w_down: torch.Tensor | QuantizedWeight,
) -> bool:
    """bf16/fp16 activations, weights of that dtype or int8, and tile-friendly dimensions.

    float32 stays on the reference path: a Triton float32 dot runs in tf32, not float32.
    """
    if x.dim() != 2 or x.dtype not in KERNEL_DTYPES or not triton_available(x.device):
        return False
    weights = (w_gate, w_up, w_down)
    quantized = [isinstance(w, QuantizedWeight) for w in weights]
    if any(quantized) and not all(quantized):
        return False
    if not all(quantized) and any(w.dtype != x.dtype for w in weights):
        return False
    if w_gate.shape != w_up.shape or any(len(w.shape) != 3 for w in weights):
        return False
    stacks = [w.weight if isinstance(w, QuantizedWeight) else w for w in weights]
    if not all(stack.is_contiguous() for stack in stacks):
        return False
    return all(rows_per_scale(w) % TILE_QUANTUM == 0 for w in weights)
