"""FlexAttention with the soft-cap and GQA against the reference `layers.attention`.

On the CPU FlexAttention runs eagerly (its unfused path; the score_mod and block mask are the same
functions the compiled GPU kernel uses); the `gpu` test runs the compiled kernel.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from grokserve.model import kernels, layers
from testkit.triton_interpreter import interpreter_flag

CAP = 30.0


@pytest.fixture(scope="module", autouse=True)
def quiet_eager_flex():
    # FlexAttention imports triton; on the CPU the flag keeps this session's Triton MoE tests runnable.
    flag = contextlib.nullcontext() if torch.cuda.is_available() else interpreter_flag()
    with flag, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        yield


def random_attention(
    batch: int,
    steps: int,
    span: int,
    q_heads: int,
    kv_heads: int,
    dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    # Large logits, so that the soft-cap bends them (30·tanh(s/30) differs from s by > 10 % here).
    q = torch.randn(batch, steps, q_heads, 16, generator=generator) * 8
    k = torch.randn(batch, span, kv_heads, 16, generator=generator) * 8
    v = torch.randn(batch, span, kv_heads, 16, generator=generator)
    positions = (torch.arange(span - steps, span).expand(batch, steps)).clone()
    key_valid = torch.rand(batch, span, generator=generator) > 0.25
    return (
        *(t.to(device, dtype) for t in (q, k, v)),
        positions.to(device),
        key_valid.to(device),
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize(
    ("steps", "span"), [(6, 6), (1, 11), (4, 13)], ids=["prefill", "decode", "chunk"]
)
def test_kernels_attention_float32_matches_reference(monkeypatch, steps, span):
    monkeypatch.setenv("GROKSERVE_KERNELS", "fast")
    args = random_attention(2, steps, span, 8, 2, torch.float32, seed=span)
    out = kernels.attention(*args, 0.25, CAP)
    ref = layers.attention(*args, 0.25, CAP)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < 1e-5
    uncapped = layers.attention(*args, 0.25, 1e9)
    assert relative_error(out, uncapped) > 1e-2  # the cap matters at these logits


def test_kernels_attention_bf16_matches_reference(monkeypatch):
    monkeypatch.setenv("GROKSERVE_KERNELS", "fast")
    args = random_attention(2, 5, 9, 6, 3, torch.bfloat16, seed=1)
    out = kernels.attention(*args, 0.25, CAP)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, layers.attention(*args, 0.25, CAP)) < 1e-2


def test_kernels_attention_query_seeing_no_key_averages_all_values(monkeypatch):
    monkeypatch.setenv("GROKSERVE_KERNELS", "fast")
    q, k, v, positions, key_valid = random_attention(1, 4, 8, 4, 2, torch.float32, seed=2)
    key_valid[0, :6] = False  # the first two queries (positions 4, 5) see nothing
    out = kernels.attention(q, k, v, positions, key_valid, 0.25, CAP)
    ref = layers.attention(q, k, v, positions, key_valid, 0.25, CAP)
    assert relative_error(out, ref) < 1e-5
    mean_value = v[0].mean(dim=0).repeat_interleave(2, dim=0)  # query head h reads kv head h // 2
    torch.testing.assert_close(out[0, 0], mean_value)


def test_kernels_attention_reference_mode_and_bad_mode(monkeypatch):
    args = random_attention(1, 3, 5, 4, 2, torch.float32, seed=3)
    monkeypatch.setenv("GROKSERVE_KERNELS", "reference")
    assert torch.equal(kernels.attention(*args, 0.25, CAP), layers.attention(*args, 0.25, CAP))
    monkeypatch.setenv("GROKSERVE_KERNELS", "fastest")
    with pytest.raises(ValueError, match="GROKSERVE_KERNELS must be one of"):
        kernels.attention(*args, 0.25, CAP)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("steps", "span"), [(300, 300), (1, 777)], ids=["prefill", "decode"])
def test_kernels_attention_gpu_compiled(steps, span):
    args = random_attention(2, steps, span, 48, 8, torch.bfloat16, 4, "cuda")
    out = kernels.attention(*args, 0.08838834764831845, CAP)
    assert relative_error(out, layers.attention(*args, 0.08838834764831845, CAP)) < 1e-2
