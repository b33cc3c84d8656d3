"""Grok-1 attention through FlexAttention: logit scale and 30·tanh soft-cap in a `score_mod`, GQA by
`enable_gqa`, and a block mask (causal by absolute position, pad keys out) so that future and empty
key blocks are skipped.

The reference gives a query that sees no key at all a uniform softmax over every key (a large finite
negative logit, not -inf). FlexAttention would return zeros for such a row, so the mask lets those rows
through and the `score_mod` gives every invisible key the reference's logit: the same numbers, with
block sparsity kept for every other row.

On CUDA the call is compiled (a fused Triton kernel); elsewhere FlexAttention's eager path runs it.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from grokserve.model.layers import MASKED_LOGIT


@functools.cache
def _compiled_flex_attention():
    # Default (automatic) dynamism: the second key span seen recompiles once with a symbolic length,
    # then decode's growing spans reuse it. dynamic=True fails to lower the score_mod's tensor reads
    # on the CPU in torch 2.13 (unbacked scalar); automatic dynamism compiles there and matches.
    return torch.compile(flex_attention)


def flex_soft_capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    key_valid: torch.Tensor,
    logit_multiplier: float,
    cap: float,
) -> torch.Tensor:
    """`layers.attention` semantics: q [B, T, Hq, K], k/v [B, S, Hkv, K] -> [B, T, Hq, K]."""
    batch, steps, _, _ = q.shape
    span = k.shape[1]
    positions = query_positions.to(torch.int64)
    key_valid = key_valid.to(torch.bool)
    # A query sees some key iff a valid key sits at or before its position.
    valid_so_far = torch.cumsum(key_valid.to(torch.int32), dim=1)
    sees_nothing = valid_so_far.gather(1, positions.clamp(max=span - 1)) == 0

    def visible(b, q_idx, kv_idx):
        return (kv_idx <= positions[b, q_idx]) & key_valid[b, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(b, q_idx, kv_idx) | sees_nothing[b, q_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        capped = cap * torch.tanh(score / cap)
        return torch.where(visible(b, q_idx, kv_idx), capped, MASKED_LOGIT)

    # Compiled on CUDA, the block mask is built block by block instead of from a materialised
    # [B, T, S] mask (hundreds of MB for a long prefill).
    block_mask = create_block_mask(
        mask_mod, batch, None, steps, span, device=q.device, _compile=q.is_cuda
    )
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    out = attend(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=logit_multiplier,
        enable_gqa=True,
    )
    return out.transpose(1, 2)
