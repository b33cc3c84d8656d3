"""Fused mixture-of-experts FFN in Triton, bf16/fp16 weights or int8 weights with row-block scales.

Two launches over the route-sorted, block-aligned rows of `routing.align_routing`:

1. gate_up: h[r] = gelu_tanh(x[t] @ W_gate[e]) · (x[t] @ W_up[e]) for the token t of row r. Both
   products share the activation tile and run in one program (two accumulators), and the GELU and the
   product happen in registers, so the [rows, F] pre-activations never reach memory.
2. down: pair[t·k + j] = round(h[r] @ W_down[e]) · g_tj, the un-renormalised gate applied in the
   epilogue and the rows scattered straight to their (token, slot) place. The two slots of a token are
   then summed in one rounding, which is what the reference's index_add computes for top-2.

W8A16: an int8 tile is widened and multiplied by its row block's scale before the dot, which is the
reference's dequantise-then-round arithmetic; only int8 bytes cross memory. A block of BLOCK_K rows
never straddles two scale blocks (the launcher picks BLOCK_K dividing the rows per scale), so each
tile needs one scale vector (w_down's 8 blocks along F included).

The roundings to the activations' dtype mirror the reference (each product, the GELU, the gated
product), so the results differ from it only by the accumulation order of the dots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from grokserve.model.kernels.routing import BlockRouting, align_routing
from grokserve.model.kernels.support import triton_interpreting
from grokserve.model.kernels.tuning import MoeTileConfig, pick_config, weight_dtype_name
from grokserve.model.quantization import QuantizedWeight

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _weight_tile(
    w_ptrs,
    s_ptrs,
    mask,
    QUANTIZED: tl.constexpr,
    compute_dtype: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """A [BLOCK_K, BLOCK_N] weight tile in the compute dtype (int8 · its row block's scale, rounded)."""
    w = tl.load(w_ptrs, mask=mask, other=0)
    if QUANTIZED:
        scale = tl.load(s_ptrs)
        w = _narrow(w.to(tl.float32) * scale[None, :].to(tl.float32), compute_dtype, INTERPRET)
    return w


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr):
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584), so under
    # the interpreter the operands are widened first; float32 products of bf16 values are exact.
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _narrow(x, compute_dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> compute_dtype, rounding to nearest even."""
    if INTERPRET and compute_dtype == tl.bfloat16:
        # Triton's interpreter truncates float32 -> bf16 casts (whatever rounding is asked for), which
        # would bias every CPU test; round on the bits instead, after which truncation is exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(compute_dtype)


@triton.jit
def _round(x, compute_dtype: tl.constexpr, INTERPRET: tl.constexpr):
    return _narrow(x, compute_dtype, INTERPRET).to(tl.float32)


@triton.jit
def _row_block(pid, num_row_blocks, num_col_blocks, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row blocks share each weight column tile while it is in L2."""
    per_group = GROUP_M * num_col_blocks
    group = pid // per_group
    first = group * GROUP_M
    size = tl.minimum(num_row_blocks - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _gate_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    sg_ptr,
    su_ptr,
    h_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    num_rows,
    D,
    F,
    rows_per_scale,
    stride_xm,
    stride_we,
    stride_wk,
    stride_se,
    stride_sk,
    stride_hm,
    TOP_K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    QUANTIZED: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    compute = h_ptr.dtype.element_ty
    pid_m, pid_n = _row_block(
        tl.program_id(0), tl.cdiv(num_rows, BLOCK_M), tl.cdiv(F, BLOCK_N), GROUP_M
    )
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= NUM_EXPERTS:
        return
    expert = expert.to(tl.int64)  # full-size offsets pass 2**31 (8 experts x 6144 x 32768)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + rows)
    tokens = pairs // TOP_K
    row_valid = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < F
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xm + ks[None, :]
    w_offsets = expert * stride_we + ks[:, None] * stride_wk + cols[None, :]
    s_offsets = expert * stride_se + cols
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = tl.load(x_ptrs + k0, mask=row_valid[:, None], other=0.0)
        scale_row = (k0 // rows_per_scale) * stride_sk
        w_mask = col_valid[None, :]
        g = _weight_tile(
            wg_ptr + w_offsets + k0 * stride_wk,
            sg_ptr + s_offsets + scale_row,
            w_mask,
            QUANTIZED,
            compute,
            INTERPRET,
        )
        u = _weight_tile(
            wu_ptr + w_offsets + k0 * stride_wk,
            su_ptr + s_offsets + scale_row,
            w_mask,
            QUANTIZED,
            compute,
            INTERPRET,
        )
        acc_gate = _mma(a, g, acc_gate, INTERPRET)
        acc_up = _mma(a, u, acc_up, INTERPRET)

    gate = _round(acc_gate, compute, INTERPRET)
    inner = SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # saturates cleanly at ±1 for large |inner|
    activated = _round(0.5 * gate * (1.0 + tanh), compute, INTERPRET)
    h = activated * _round(acc_up, compute, INTERPRET)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptrs, _narrow(h, compute, INTERPRET), mask=col_valid[None, :])


@triton.jit
def _down_kernel(
    h_ptr,
    w_ptr,
    s_ptr,
    gates_ptr,
    out_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    num_rows,
    F,
    D,
    rows_per_scale,
    stride_hm,
    stride_we,
    stride_wk,
    stride_se,
    stride_sk,
    stride_om,
    NUM_EXPERTS: tl.constexpr,
    QUANTIZED: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    compute = out_ptr.dtype.element_ty
    pid_m, pid_n = _row_block(
        tl.program_id(0), tl.cdiv(num_rows, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M
    )
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= NUM_EXPERTS:
        return
    expert = expert.to(tl.int64)  # full-size offsets pass 2**31 (8 experts x 6144 x 32768)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_valid = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < D
    ks = tl.arange(0, BLOCK_K)

    h_ptrs = h_ptr + rows[:, None] * stride_hm + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :]
    s_ptrs = s_ptr + expert * stride_se + cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        a = tl.load(h_ptrs + k0)
        w = _weight_tile(
            w_ptrs + k0 * stride_wk,
            s_ptrs + (k0 // rows_per_scale) * stride_sk,
            col_valid[None, :],
            QUANTIZED,
            compute,
            INTERPRET,
        )
        acc = _mma(a, w, acc, INTERPRET)

    gate = _round(tl.load(gates_ptr + pairs, mask=row_valid, other=0.0), compute, INTERPRET)
    y = _round(acc, compute, INTERPRET) * gate[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, _narrow(y, compute, INTERPRET), mask=row_valid[:, None] & col_valid[None, :])


def _parts(weight: torch.Tensor | QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix stack and its scales ([E, S, out]); a dense weight passes itself as a dummy."""
    if isinstance(weight, QuantizedWeight):
        return weight.weight, weight.scales
    return weight, weight


def _contiguous_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix if matrix.stride(-1) == 1 else matrix.contiguous()


def fused_moe(
    x: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor | QuantizedWeight,
    w_up: torch.Tensor | QuantizedWeight,
    w_down: torch.Tensor | QuantizedWeight,
    expert_ids: Sequence[int] | None = None,
    config: MoeTileConfig | None = None,
) -> torch.Tensor:
    """`layers.moe` semantics (expert ids in any order); inputs must pass `support.fast_moe_supported`."""
    num_tokens, top_k = experts.shape
    num_experts, model_size, ffn_size = w_gate.shape
    expert_ids = expert_ids if expert_ids is not None else range(num_experts)
    if len(expert_ids) != num_experts:
        raise ValueError(f"{len(expert_ids)} expert ids for a stack of {num_experts} experts")
    quantized = isinstance(w_gate, QuantizedWeight)
    if config is None:
        weight_dtype = torch.int8 if isinstance(w_gate, QuantizedWeight) else w_gate.dtype
        config = pick_config(num_tokens, num_experts, ffn_size, weight_dtype_name(weight_dtype))

    x = _contiguous_rows(x)
    routing = align_routing(experts, expert_ids, config.block_m)
    h = torch.empty(routing.padded_rows, ffn_size, dtype=x.dtype, device=x.device)
    wg, sg = _parts(w_gate)
    wu, su = _parts(w_up)
    wd, sd = _parts(w_down)
    for matrix in (wg, wu, wd):
        if not matrix.is_contiguous():
            raise ValueError("fused_moe needs contiguous expert weight stacks")
    interpret = triton_interpreting()
    _launch_gate_up(x, wg, wu, sg, su, h, routing, quantized, interpret, config, top_k)

    # Pairs of other shards' experts stay zero: this shard's share of their sum.
    pair_out = torch.zeros(num_tokens * top_k, model_size, dtype=x.dtype, device=x.device)
    _launch_down(h, wd, sd, gates, pair_out, routing, quantized, interpret, config)
    return pair_out.view(num_tokens, top_k, model_size).sum(dim=1)


def _launch_down(
    h: torch.Tensor,
    wd: torch.Tensor,
    sd: torch.Tensor,
    gates: torch.Tensor,
    pair_out: torch.Tensor,
    routing: BlockRouting,
    quantized: bool,
    interpret: bool,
    config: MoeTileConfig,
) -> None:
    num_experts, ffn_size, model_size = wd.shape
    rows_per_scale = ffn_size // (sd.shape[-2] if quantized else 1)
    down_k = _block_k(config.down_block_k, rows_per_scale)
    gates_flat = gates.reshape(-1).float().contiguous()
    grid = (
        triton.cdiv(routing.padded_rows, config.block_m)
        * triton.cdiv(model_size, config.down_block_n),
    )
    _down_kernel[grid](
        h,
        wd,
        sd,
        gates_flat,
        pair_out,
        routing.sorted_pairs,
        routing.block_expert,
        routing.num_pairs,
        routing.padded_rows,
        ffn_size,
        model_size,
        rows_per_scale,
        h.stride(0),
        wd.stride(0),
        wd.stride(1),
        sd.stride(0),
        sd.stride(-2),
        pair_out.stride(0),
        NUM_EXPERTS=num_experts,
        QUANTIZED=quantized,
        INTERPRET=interpret,
        BLOCK_M=config.block_m,
        BLOCK_N=config.down_block_n,
        BLOCK_K=down_k,
        GROUP_M=config.group_m,
        num_warps=config.down_warps,
        num_stages=config.down_stages,
    )


def _launch_gate_up(
    x: torch.Tensor,
    wg: torch.Tensor,
    wu: torch.Tensor,
    sg: torch.Tensor,
    su: torch.Tensor,
    h: torch.Tensor,
    routing: BlockRouting,
    quantized: bool,
    interpret: bool,
    config: MoeTileConfig,
    top_k: int,
) -> None:
    num_experts, model_size, ffn_size = wg.shape
    if wu.stride() != wg.stride() or (quantized and su.stride() != sg.stride()):
        raise ValueError("w_gate and w_up must be laid out alike")
    rows_per_scale = model_size // (sg.shape[-2] if quantized else 1)
    block_k = _block_k(config.gate_up_block_k, rows_per_scale)
    grid = (
        triton.cdiv(routing.padded_rows, config.block_m)
        * triton.cdiv(ffn_size, config.gate_up_block_n),
    )
    _gate_up_kernel[grid](
        x,
        wg,
        wu,
        sg,
        su,
        h,
        routing.sorted_pairs,
        routing.block_expert,
        routing.num_pairs,
        routing.padded_rows,
        model_size,
        ffn_size,
        rows_per_scale,
        x.stride(0),
        wg.stride(0),
        wg.stride(1),
        sg.stride(0),
        sg.stride(-2),
        h.stride(0),
        TOP_K=top_k,
        NUM_EXPERTS=num_experts,
        QUANTIZED=quantized,
        INTERPRET=interpret,
        BLOCK_M=config.block_m,
        BLOCK_N=config.gate_up_block_n,
        BLOCK_K=block_k,
        GROUP_M=config.group_m,
        num_warps=config.gate_up_warps,
        num_stages=config.gate_up_stages,
    )


def _block_k(preferred: int, rows_per_scale_block: int) -> int:
    """The largest power of two ≤ preferred that divides the rows sharing one scale."""
    block_k = preferred
    while rows_per_scale_block % block_k:
        block_k //= 2
    return block_k
