"""Logit adjustments of a SamplingParams (bias, penalties, min_tokens), applied before sampling.

The penalties follow the APIs that define them: OpenAI's presence and frequency penalties count
the generated tokens only; the repetition penalty (CTRL, as vLLM and Hugging Face apply it) divides
positive and multiplies negative logits of every token seen in the prompt or the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # sampling imports this module
    from grokserve.model.sampling import SamplingParams


def adjust(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int],
    output: Sequence[int],
    eos_id: int | None,
) -> torch.Tensor:
    """logits [V] (float32) of one sequence, adjusted as `params` asks; a new tensor."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        bias = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
        logits.index_add_(0, ids, bias)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt, *output}), dtype=torch.long)
        if len(seen):
            values = logits[seen]
            penalty = params.repetition_penalty
            logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if len(output) < params.min_tokens:
        ended = [*params.stop_token_ids, *([eos_id] if eos_id is not None else [])]
        logits[torch.tensor(ended, dtype=torch.long)] = float("-inf")
    return logits
