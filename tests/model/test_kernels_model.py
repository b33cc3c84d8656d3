"""A whole model forward on the fast paths (Triton MoE interpreted, FlexAttention eager) vs reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from grokserve.model.transformer import GrokModel
from testkit.triton_interpreter import interpreter_flag


def test_kernels_model_fast_paths_match_reference_logits(monkeypatch):
    with interpreter_flag(), warnings.catch_warnings():
        pytest.importorskip(
            "triton", reason="the triton package is not installed (pip install triton)"
        )
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        model = GrokModel.from_preset("grok-tiny", seed=4).astype(torch.bfloat16)
        tokens = torch.randint(
            3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4)
        )
        tokens[1, :2] = model.config.pad_token  # left padding: rows whose queries see no key
        monkeypatch.setenv("GROKSERVE_KERNELS", "reference")
        ref = model(tokens)
        monkeypatch.setenv("GROKSERVE_KERNELS", "fast")
        cache = model.new_cache(2, 16)
        prefill = model(tokens[:, :5], cache)
        decode = model(tokens[:, 5:], cache)
        fast = torch.cat((prefill, decode), dim=1)
    valid = tokens != model.config.pad_token
    error = (fast[valid] - ref[valid]).norm() / ref[valid].norm()
    assert torch.isfinite(fast).all() and error < 2e-2, error
    assert (fast[valid].argmax(-1) == ref[valid].argmax(-1)).float().mean() > 0.9
