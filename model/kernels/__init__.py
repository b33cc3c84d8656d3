"""Fast GPU paths for the two heavy parts of a layer, behind dispatchers with the reference signatures.

`moe` and `attention` compute exactly what `grokserve.model.layers.moe` / `.attention` compute. On a
CUDA device the fast path runs (Triton fused MoE, FlexAttention); elsewhere, or with the environment
variable `GROKSERVE_KERNELS=reference`, the reference path runs. `GROKSERVE_KERNELS=fast` forces the
fast path on any device (the CPU tests use it with `TRITON_INTERPRET=1`).

The MoE weights may be dense tensors or `QuantizedWeight`s (int8 with row-block scales): the fused
kernel dequantises inside the kernel, the reference path dequantises to the activations' dtype first.
From the token count of `crossover.LOOP_FROM_TOKENS` on, the fast path runs the per-expert cuBLAS
loop instead of the fused kernel (an int8 expert dequantised just before its matmuls).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from grokserve.model import layers
from grokserve.model.kernels.crossover import runs_loop
from grokserve.model.kernels.support import fast_moe_supported
from grokserve.model.kernels.tuning import weight_dtype_name
from grokserve.model.quantization import QuantizedWeight, dense, dequantize

Weight = torch.Tensor | QuantizedWeight

MODES = ("auto", "reference", "fast")
# What `moe` runs: the fused Triton kernel, the per-expert cuBLAS loop, or the reference.
MOE_PATHS = ("fused", "loop", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("GROKSERVE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"GROKSERVE_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


def wants_fast_path(device: torch.device) -> bool:
    mode = kernel_mode()
    if mode == "reference":
        return False
    return mode == "fast" or device.type == "cuda"


def whole_graph() -> bool:
    """A whole step is being compiled or captured: no data-dependent shapes or host syncs allowed."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return torch.compiler.is_compiling() or capturing


def moe(
    x: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    w_down: Weight,
    expert_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """`layers.moe` with the fused Triton kernel where it applies (see the module docstring).

    Under `torch.compile` or a CUDA-graph capture the reference path is `layers.moe_dense` (every
    expert on every token, no shape that depends on the routing), so that a whole step compiles or is
    captured as one graph; eager, it loops over the experts that have tokens (E/k times fewer expert
    FLOPs). The fused kernel sizes everything from the shapes alone either way."""
    path = moe_path(x, w_gate, w_up, w_down)
    if path == "fused":
        from grokserve.model.kernels.moe_triton import fused_moe

        return fused_moe(x, gates, experts, w_gate, w_up, w_down, expert_ids)
    if path == "loop":
        return expert_loop_moe(x, gates, experts, w_gate, w_up, w_down, expert_ids)
    dtype = x.dtype
    reference = layers.moe_dense if whole_graph() else layers.moe
    return reference(
        x,
        gates,
        experts,
        dense(w_gate, dtype),
        dense(w_up, dtype),
        dense(w_down, dtype),
        expert_ids,
    )


def moe_path(x: torch.Tensor, w_gate: Weight, w_up: Weight, w_down: Weight) -> str:
    """Which of `MOE_PATHS` `moe` runs for these inputs. The loop synchronises with the host per
    expert, so a compiled or captured step keeps the fused kernel at any size."""
    if not (wants_fast_path(x.device) and fast_moe_supported(x, w_gate, w_up, w_down)):
        return "reference"
    experts, _, ffn = w_gate.shape
    if not whole_graph() and runs_loop(x.shape[0], experts, ffn, weight_dtype(w_gate)):
        return "loop"
    return "fused"


def weight_dtype(weight: Weight) -> str:
    """The crossover table's name for a weight stack's stored dtype."""
    stored = weight.weight if isinstance(weight, QuantizedWeight) else weight
    return weight_dtype_name(stored.dtype)


def expert_loop_moe(
    x: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    w_down: Weight,
    expert_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """`layers.moe` (cuBLAS matmuls per expert with tokens); an int8 expert is dequantised to x's
    dtype (chunked, as `dense` does) just before its matmuls, so only one expert's bf16 copy exists."""

    def matrix(weight: Weight, local: int) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            return dequantize(weight.weight[local], weight.scales[local], x.dtype)
        return weight[local]

    def expert_weights(local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return matrix(w_gate, local), matrix(w_up, local), matrix(w_down, local)

    ids = expert_ids if expert_ids is not None else range(w_gate.shape[0])
    return layers.moe_loop(x, gates, experts, expert_weights, ids, w_down.shape[-1])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    key_valid: torch.Tensor,
    logit_multiplier: float,
    cap: float,
) -> torch.Tensor:
    """`layers.attention` through FlexAttention on the fast path (soft-cap in its score_mod)."""
    if wants_fast_path(q.device):
        from grokserve.model.kernels.attention_flex import flex_soft_capped_attention

        return flex_soft_capped_attention(
            q, k, v, query_positions, key_valid, logit_multiplier, cap
        )
    return layers.attention(q, k, v, query_positions, key_valid, logit_multiplier, cap)
