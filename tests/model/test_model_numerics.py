"""Numerical identities of the model: cache vs full forward, padding, bf16 rounding, the spec's formulas."""

import math

import pytest
import torch

from grokserve.model import CacheFullError, GrokModel, layers
from grokserve.model.quantization import dequantize, quantize


@pytest.fixture(scope="module")
def tiny() -> GrokModel:
    return GrokModel.from_preset("grok-tiny", seed=0)


def random_tokens(rows: int, steps: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (rows, steps), generator=torch.Generator().manual_seed(seed))


def test_prefill_then_decode_equals_full_forward(tiny: GrokModel) -> None:
    tokens = random_tokens(3, 12)
    full = tiny(tokens)
    cache = tiny.new_cache(batch_size=3, max_len=16)
    pieces = [tiny(tokens[:, :5], cache=cache)]
    pieces += [tiny(tokens[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [12, 12, 12]


def test_rows_of_different_lengths_decode_independently(tiny: GrokModel) -> None:
    short, long = random_tokens(1, 4, seed=1)[0], random_tokens(1, 9, seed=2)[0]
    cache = tiny.new_cache(batch_size=2, max_len=12)
    tiny(short[None, :3], cache=cache, rows=torch.tensor([0]))
    tiny(long[None, :8], cache=cache, rows=torch.tensor([1]))
    both = tiny(torch.stack([short[3:4], long[8:9]]), cache=cache)  # one decode step for both rows
    torch.testing.assert_close(both[0, 0], tiny(short[None])[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1, 0], tiny(long[None])[0, -1], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [4, 9]
    cache.reset([0])
    assert cache.lengths.tolist() == [0, 9]


def test_right_padded_rows_equal_unpadded_rows_on_valid_positions(tiny: GrokModel) -> None:
    a, b = random_tokens(1, 10, seed=3)[0], random_tokens(1, 6, seed=4)[0]
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0], batch[1, :6] = a, b
    logits = tiny(batch)
    torch.testing.assert_close(logits[0], tiny(a[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, :6], tiny(b[None])[0], atol=1e-5, rtol=0)


def test_left_padded_rows_equal_unpadded_rows_on_valid_positions(tiny: GrokModel) -> None:
    # RoPE is relative, so shifting every real token by the same pad count keeps the logits.
    b = random_tokens(1, 6, seed=5)[0]
    batch = torch.zeros(1, 10, dtype=torch.long)
    batch[0, 4:] = b
    torch.testing.assert_close(tiny(batch)[0, 4:], tiny(b[None])[0], atol=1e-4, rtol=0)


def decode_through_cache(model: GrokModel, batch: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of `batch` fed as one prefill chunk of `prefill` tokens, then one token per step."""
    cache = model.new_cache(batch_size=batch.shape[0], max_len=batch.shape[1])
    pieces = [model(batch[:, :prefill], cache=cache)]
    pieces += [model(batch[:, i : i + 1], cache=cache) for i in range(prefill, batch.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_rows_decoded_through_the_cache_equal_each_sequence_alone(
    tiny: GrokModel, padding: str
) -> None:
    long, short = random_tokens(1, 9, seed=7)[0], random_tokens(1, 5, seed=8)[0]
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0] = long
    real = slice(0, 5) if padding == "right" else slice(4, 9)
    batch[1, real] = short
    # Left: the prefill chunk holds only pads, which later steps must still see as masked keys.
    # Right: the pads arrive one decode step at a time after the short row's real tokens.
    logits = decode_through_cache(tiny, batch, prefill=4)
    torch.testing.assert_close(logits[0], tiny(long[None])[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1, real], tiny(short[None])[0], atol=1e-4, rtol=0)


def test_a_row_of_only_padding_gives_finite_logits(tiny: GrokModel) -> None:
    logits = tiny(torch.zeros(1, 4, dtype=torch.long))
    assert torch.isfinite(logits).all()


def test_bfloat16_multipliers_round_to_bfloat16_constants() -> None:
    assert layers.rounded(78.38367176906169, torch.bfloat16).item() == 78.5
    assert layers.rounded(0.5773502691896257, torch.bfloat16).item() == 0.578125
    assert layers.rounded(78.38367176906169, torch.float32).item() == pytest.approx(
        78.38367176906169
    )


def test_rms_norm_multiplies_by_the_scale_itself() -> None:
    x = torch.tensor([[3.0, 4.0]])
    scale = torch.tensor([2.0, 0.5])
    rms = math.sqrt((9 + 16) / 2 + 1e-5)
    torch.testing.assert_close(layers.rms_norm(x, scale, 1e-5), torch.tensor([[6 / rms, 2 / rms]]))


def test_rope_rotates_the_whole_head_in_rotate_half_layout() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    position = 3
    out = layers.apply_rope(x, torch.tensor([[position]]), theta=10000.0)[0, 0, 0]
    inv = [1.0, 10000 ** (-2 / 4)]
    c0, s0 = math.cos(position * inv[0]), math.sin(position * inv[0])
    c1, s1 = math.cos(position * inv[1]), math.sin(position * inv[1])
    expected = torch.tensor([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1])
    torch.testing.assert_close(out, expected)


def test_gelu_is_the_tanh_approximation_not_erf() -> None:
    x = torch.tensor([-2.0, -0.5, 0.7, 3.0])
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(layers.gelu_tanh(x), expected, atol=1e-6, rtol=0)
    assert (layers.gelu_tanh(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-5


def test_attention_soft_caps_scaled_logits_at_thirty() -> None:
    assert layers.soft_cap(torch.tensor(300.0), 30.0).item() == pytest.approx(30 * math.tanh(10))
    # Two keys whose raw logits differ hugely: after the cap their weights are exp(±30·tanh(·/30)).
    q = torch.ones(1, 1, 1, 1) * 10
    k = torch.tensor([[[[100.0]], [[-100.0]]]])  # [B, S=2, Hkv=1, K=1]
    v = torch.tensor([[[[1.0]], [[0.0]]]])
    out = layers.attention(
        q, k, v, torch.tensor([[1]]), torch.ones(1, 2, dtype=torch.bool), 0.5, 30.0
    )
    hi, lo = 30 * math.tanh(500 / 30), 30 * math.tanh(-500 / 30)
    expected = math.exp(hi) / (math.exp(hi) + math.exp(lo))
    assert out.item() == pytest.approx(expected)


def test_router_ties_go_to_the_lower_expert_and_gates_are_not_renormalised() -> None:
    x = torch.ones(1, 2)
    router = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # experts 1, 2, 3 tie
    gates, experts = layers.route(x, router, top_k=2)
    assert experts.tolist() == [[1, 2]]
    probs = torch.softmax(torch.tensor([0.0, 1.0, 1.0, 1.0]), 0)
    torch.testing.assert_close(gates, probs[1:3][None])
    assert gates.sum() < 1


def test_moe_weights_expert_outputs_by_raw_gates() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    w_gate, w_up, w_down = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 6, 4)
    gates = torch.tensor([[0.6, 0.3], [0.5, 0.1], [0.2, 0.2]])
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    out = layers.moe(x, gates, experts, w_gate, w_up, w_down)
    for t in range(3):
        want = sum(
            gates[t, j] * layers.expert_ffn(x[t], w_gate[e], w_up[e], w_down[e])
            for j, e in enumerate(experts[t])
        )
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


# Chunks of one row, of three rows (straddling row blocks and experts), and the whole stack at once.
@pytest.mark.parametrize("chunk_elements", [5, 15, 10**9])
def test_dequantised_int8_matrix_is_weight_times_row_block_scale_exactly(
    chunk_elements: int,
) -> None:
    torch.manual_seed(0)
    matrix = torch.randn(2, 16, 5)
    q = quantize(matrix, blocks=8)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (2, 8, 5)
    w = dequantize(q.weight, q.scales, chunk_elements=chunk_elements)
    for r in range(16):
        expected = q.weight[:, r, :].float() * q.scales[:, r // 2, :].float()
        assert torch.equal(w[:, r, :], expected)
    assert (w - matrix).abs().max() < matrix.abs().max() / 100
    half = dequantize(q.weight, q.scales, torch.bfloat16, chunk_elements=chunk_elements)
    assert torch.equal(half, w.bfloat16())  # rounded once, from the exact float32 product


def test_int8_model_keeps_int8_weights_and_row_blocks_of_the_release(tiny: GrokModel) -> None:
    quantized = tiny.quantized()
    assert quantized.layers[0].attn.wo.weight.dtype == torch.int8
    assert quantized.layers[0].attn.wo.row_blocks == 8
    assert quantized.layers[0].moe.w_down.row_blocks == 8
    assert quantized.layers[0].attn.wq.row_blocks == 1
    tokens = random_tokens(1, 6, seed=7)
    assert (quantized(tokens) - tiny(tokens)).abs().max() < 0.2


def test_expert_token_counts_count_routed_real_tokens() -> None:
    model = GrokModel.from_preset("grok-tiny", seed=1)
    tokens = random_tokens(2, 5, seed=8)
    tokens[1, 3:] = 0  # two pad tokens are not counted
    model(tokens)
    counts = model.expert_token_counts()
    assert counts.shape == (2, 8)
    assert counts.sum(dim=1).tolist() == [8 * 2, 8 * 2]


def test_bad_tokens_and_a_full_cache_are_refused_with_a_message(tiny: GrokModel) -> None:
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        tiny(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="LongTensor"):
        tiny(torch.tensor([1, 2]))
    cache = tiny.new_cache(batch_size=1, max_len=4)
    tiny(random_tokens(1, 3), cache=cache)
    with pytest.raises(CacheFullError, match="exceeds its capacity"):
        tiny(random_tokens(1, 2), cache=cache)
    assert cache.lengths.tolist() == [3]
    with pytest.raises(ValueError, match="context length"):
        tiny.new_cache(batch_size=1, max_len=10**6)


def test_bfloat16_moe_rounds_the_gate_and_sums_in_bfloat16_as_the_reference() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 8).bfloat16()
    w_gate, w_up, w_down = (
        torch.randn(3, 8, 16).bfloat16(),
        torch.randn(3, 8, 16).bfloat16(),
        torch.randn(3, 16, 8).bfloat16(),
    )
    gates = torch.rand(4, 2) / 2
    experts = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]])
    out = layers.moe(x, gates, experts, w_gate, w_up, w_down)
    assert out.dtype == torch.bfloat16
    for t in range(4):
        products = [
            layers.expert_ffn(x[t], w_gate[e], w_up[e], w_down[e]) * gates[t, j].bfloat16()
            for j, e in enumerate(experts[t])
        ]
        assert torch.equal(out[t], products[0] + products[1])
