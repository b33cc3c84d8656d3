"""The arithmetic of one Grok-1 layer, as plain functions (grok1-spec.md §2).

These are the reference paths: exact to the spec, used on the CPU and in tests. Fast GPU kernels in
`grokserve.model.kernels` must compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Large and finite, so that a row whose keys are all masked softmaxes to uniform instead of NaN.
MASKED_LOGIT = -1e30


def rms_norm(
    x: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """scale · x · rsqrt(mean(x²) + eps), computed in float32, returned in `dtype` (x's by default)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * scale.float()).to(dtype or x.dtype)


def rope_inverse_frequencies(
    key_size: int, theta: float, device: torch.device | None = None
) -> torch.Tensor:
    exponents = torch.arange(0, key_size, 2, dtype=torch.float32, device=device) / key_size
    return 1.0 / (theta**exponents)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dimension, in float32.

    x: [B, T, H, K]; positions: [B, T] absolute indices.
    """
    key_size = x.shape[-1]
    inverse = rope_inverse_frequencies(key_size, theta, x.device)
    phase = positions.float()[..., None] * inverse  # [B, T, K/2]
    phase = torch.cat((phase, phase), dim=-1)[:, :, None, :]  # broadcast over heads
    x32 = x.float()
    half = key_size // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * torch.cos(phase) + rotated * torch.sin(phase)).to(x.dtype)


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(logits / cap)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): the reference's approximate GELU, not the erf one."""
    return F.gelu(x, approximate="tanh")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    key_valid: torch.Tensor,
    logit_multiplier: float,
    cap: float,
) -> torch.Tensor:
    """Grouped-query attention with the Grok-1 logit scaling, soft-cap and mask.

    q: [B, T, Hq, K]; k, v: [B, S, Hkv, K] where key j sits at position j; query_positions: [B, T];
    key_valid: [B, S] (False for pad tokens and unfilled cache slots). Query head h reads kv head
    h // (Hq / Hkv). Returns [B, T, Hq, K] in v's dtype.
    """
    batch, steps, q_heads, key_size = q.shape
    kv_heads = k.shape[2]
    grouped = q.view(batch, steps, kv_heads, q_heads // kv_heads, key_size)
    # The product runs in the activations' dtype, as in the reference; everything after is float32.
    scores = torch.einsum("btngk,bsnk->bngts", grouped, k).float() * logit_multiplier
    scores = soft_cap(scores, cap)
    key_positions = torch.arange(k.shape[1], device=k.device)
    visible = (key_positions[None, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :]
    scores = scores.masked_fill(~visible[:, None, None, :, :], MASKED_LOGIT)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("bngts,bsnk->btngk", probs, v)
    return out.reshape(batch, steps, q_heads, key_size)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 softmax router over all experts; returns the raw top-k probabilities and expert ids.

    Ties go to the lower expert index (a stable descending sort), and the selected probabilities are
    not renormalised: they sum to less than 1, as in the reference.
    """
    probs = torch.softmax(x.float() @ router.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return probs.gather(-1, order), order


def expert_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """One gated expert: (gelu_tanh(x @ W_gate) * (x @ W_up)) @ W_down; matrices are [in, out]."""
    return (gelu_tanh(x @ w_gate) * (x @ w_up)) @ w_down


def moe(
    x: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    expert_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Σ_j gate_j · expert_{e_j}(x) over the selected experts, token-grouped per expert.

    x: [N, D]; gates, experts: [N, k]; w_*: [E_local, ...] for the experts `expert_ids` (all by default;
    a shard passes its own ids, in any order, and gets the partial sum of its experts). As in the
    reference, the float32 gate is rounded to x's dtype and the product and the sum run in x's dtype
    (with Grok's two experts per token the sum is one rounding, whatever order the experts are added in).
    The fused GPU kernel makes the same roundings.
    """
    expert_ids = expert_ids if expert_ids is not None else range(w_gate.shape[0])
    return moe_loop(
        x,
        gates,
        experts,
        lambda local: (w_gate[local], w_up[local], w_down[local]),
        expert_ids,
        w_down.shape[-1],
    )


def moe_loop(
    x: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    expert_ids: Sequence[int],
    out_features: int,
) -> torch.Tensor:
    """`moe`'s loop, taking each local expert's (W_gate, W_up, W_down) from `expert_weights(local)`,
    called only for experts that have tokens (so an int8 stack can be dequantised one expert at a time)."""
    out = torch.zeros(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for local, expert in enumerate(expert_ids):
        token, slot = torch.nonzero(experts == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        y = expert_ffn(x[token], *expert_weights(local))
        out.index_add_(0, token, y * gates[token, slot, None].to(x.dtype))
    return out


def moe_dense(
    x: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    expert_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """`moe` with shapes that do not depend on the routing: every expert runs on every token and
    unselected experts get gate 0. The same numbers as `moe` (the zero terms add exactly, the two
    selected terms are summed in one rounding either way); E/k times the expert FLOPs, which small
    decode batches on the CPU do not notice."""
    expert_ids = expert_ids if expert_ids is not None else range(w_gate.shape[0])
    # [N, k, E_local] -> [N, E_local]: each local expert's gate for each token, 0 where not selected.
    # Compared with Python ints, not a tensor of ids: no host-to-device copy inside a CUDA graph.
    chosen = torch.stack([experts == expert for expert in expert_ids], dim=-1)
    weights = (gates[:, :, None] * chosen).sum(dim=1).to(x.dtype)
    hidden = gelu_tanh(torch.einsum("nd,edf->enf", x, w_gate)) * torch.einsum(
        "nd,edf->enf", x, w_up
    )
    y = torch.einsum("enf,efd->end", hidden, w_down)
    return (y * weights.T[:, :, None]).sum(dim=0)


def rounded(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A multiplier as a 0-d tensor of the compute dtype: in bf16, 78.38… becomes 78.5, as in the reference."""
    return torch.tensor(value, dtype=dtype)
