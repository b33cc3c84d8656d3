"""The fused Triton MoE against the reference `layers.moe`.

On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes; with CUDA
the `gpu` tests run them compiled at a moderate size. Without the `triton` package the interpreter
tests skip.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from grokserve.model import layers, quantization
from grokserve.model.kernels.routing import align_routing
from grokserve.model.kernels.tuning import MoeTileConfig
from grokserve.model.quantization import QuantizedWeight, quantize
from testkit.triton_interpreter import interpreter_flag

# Small tiles so that several row and column blocks (and padding rows) occur at test sizes.
SMALL_TILES = MoeTileConfig(16, 32, 32, 4, 1, 32, 32, 4, 1, group_m=2)


@pytest.fixture(scope="module")
def interpreted_moe():
    """moe_triton with its kernels built for Triton's CPU interpreter."""
    with interpreter_flag():
        pytest.importorskip(
            "triton", reason="the triton package is not installed (pip install triton)"
        )
        yield importlib.import_module("grokserve.model.kernels.moe_triton")


def random_moe(
    tokens: int, model: int, ffn: int, experts: int, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    x = draw(tokens, model).bfloat16()
    w_gate = draw(experts, model, ffn, scale=model**-0.5).bfloat16()
    w_up = draw(experts, model, ffn, scale=model**-0.5).bfloat16()
    w_down = draw(experts, ffn, model, scale=ffn**-0.5).bfloat16()
    gates, chosen = layers.route(x, draw(model, experts), 2)
    return x, gates, chosen, w_gate, w_up, w_down


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_kernels_moe_bf16_matches_reference(interpreted_moe, tokens):
    x, gates, chosen, w_gate, w_up, w_down = random_moe(tokens, 64, 128, 4, seed=tokens)
    out = interpreted_moe.fused_moe(x, gates, chosen, w_gate, w_up, w_down, None, SMALL_TILES)
    ref = layers.moe(x, gates, chosen, w_gate, w_up, w_down)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # Same roundings as the reference; only the dots' accumulation order differs.
    assert relative_error(out, ref) < 2e-3


def test_kernels_moe_int8_row_blocks_match_dequantised_reference(interpreted_moe):
    x, gates, chosen, w_gate, w_up, w_down = random_moe(9, 64, 128, 4, seed=11)
    # As released: one scale row for gate/up, 8 row blocks along F for down (16 rows each here).
    q_gate, q_up, q_down = quantize(w_gate.float()), quantize(w_up.float()), quantize(w_down, 8)
    out = interpreted_moe.fused_moe(
        x, gates, chosen, q_gate, q_up, q_down, None, MoeTileConfig(16, 32, 64, 4, 1, 32, 64, 4, 1)
    )
    dense = [w.dequantize(torch.bfloat16) for w in (q_gate, q_up, q_down)]
    ref = layers.moe(x, gates, chosen, *dense)
    assert relative_error(out, ref) < 2e-3
    # Ignoring the 8 down-projection scales (one scale per column) would be far off.
    wrong_down = QuantizedWeight(q_down.weight, q_down.scales[:, :1].clone())
    wrong = layers.moe(x, gates, chosen, dense[0], dense[1], wrong_down.dequantize(torch.bfloat16))
    assert relative_error(out, wrong) > 0.05


def test_kernels_moe_expert_shard_gives_its_partial_sum(interpreted_moe):
    x, gates, chosen, w_gate, w_up, w_down = random_moe(12, 32, 64, 8, seed=3)
    held = range(2, 4)
    mine = [w[2:4].contiguous() for w in (w_gate, w_up, w_down)]
    out = interpreted_moe.fused_moe(x, gates, chosen, *mine, held, SMALL_TILES)
    ref = layers.moe(x, gates, chosen, *mine, held)
    assert relative_error(out, ref) < 2e-3
    untouched = ~((chosen >= 2) & (chosen < 4)).any(dim=1)
    assert untouched.any() and (out[untouched] == 0).all()


@pytest.mark.parametrize("held", [[5, 1, 6], [7, 0]])
def test_kernels_moe_shard_of_unordered_scattered_experts_matches_reference(interpreted_moe, held):
    # An expert-parallel shard holds whichever experts the placement gave it, in its own order.
    x, gates, chosen, w_gate, w_up, w_down = random_moe(16, 32, 64, 8, seed=len(held))
    mine = [w[held].contiguous() for w in (w_gate, w_up, w_down)]
    out = interpreted_moe.fused_moe(x, gates, chosen, *mine, held, SMALL_TILES)
    ref = layers.moe(x, gates, chosen, *mine, held)
    assert relative_error(out, ref) < 2e-3
    untouched = ~torch.isin(chosen, torch.tensor(held)).any(dim=1)
    assert untouched.any() and (out[untouched] == 0).all()


def test_kernels_moe_dispatcher_runs_the_fused_path_when_forced(interpreted_moe, monkeypatch):
    from grokserve.model import kernels

    x, gates, chosen, w_gate, w_up, w_down = random_moe(5, 64, 128, 4, seed=5)
    q = [quantize(w_gate.float()), quantize(w_up.float()), quantize(w_down, 8)]
    calls = []
    real = interpreted_moe.fused_moe
    monkeypatch.setattr(interpreted_moe, "fused_moe", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("GROKSERVE_KERNELS", "fast")
    out = kernels.moe(x, gates, chosen, *q)
    monkeypatch.setenv("GROKSERVE_KERNELS", "reference")
    ref = kernels.moe(x, gates, chosen, *q)
    assert calls == [1]
    assert relative_error(out, ref) < 2e-3


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_kernels_moe_dispatcher_runs_the_loop_from_the_crossover_and_fused_below(
    interpreted_moe, monkeypatch, int8
):
    from grokserve.model import kernels

    x, gates, chosen, w_gate, w_up, w_down = random_moe(8, 64, 128, 4, seed=21)
    weights = (w_gate, w_up, w_down)
    if int8:
        weights = (quantize(w_gate.float()), quantize(w_up.float()), quantize(w_down, 8))
    ran = []
    real_fused, real_loop = interpreted_moe.fused_moe, kernels.expert_loop_moe
    monkeypatch.setattr(
        interpreted_moe, "fused_moe", lambda *a: ran.append("fused") or real_fused(*a)
    )
    monkeypatch.setattr(kernels, "expert_loop_moe", lambda *a: ran.append("loop") or real_loop(*a))
    monkeypatch.setenv("GROKSERVE_KERNELS", "fast")
    monkeypatch.setenv("GROKSERVE_MOE_LOOP_FROM", "8")
    at_threshold = kernels.moe(x, gates, chosen, *weights)
    below = kernels.moe(x[:7], gates[:7], chosen[:7], *weights)
    assert ran == ["loop", "fused"]
    ref = layers.moe(x, gates, chosen, *[quantization.dense(w, x.dtype) for w in weights])
    assert torch.equal(at_threshold, ref)  # the loop is the reference's arithmetic, int8 included
    assert relative_error(below, ref[:7]) < 2e-3


def test_kernels_moe_crossover_table_is_what_the_dispatcher_reads(monkeypatch):
    from grokserve.model.kernels import crossover

    monkeypatch.delenv("GROKSERVE_MOE_LOOP_FROM", raising=False)
    assert not crossover.runs_loop(256, 8, 32768, "bf16")
    assert crossover.runs_loop(1024, 8, 32768, "bf16")
    assert not crossover.runs_loop(4096, 8, 32768, "int8")
    assert crossover.runs_loop(16384, 8, 32768, "int8")
    assert not crossover.runs_loop(16384, 8, 4096, "bf16")  # the slice keeps the fused kernel
    monkeypatch.setenv("GROKSERVE_MOE_LOOP_FROM", "0")
    with pytest.raises(ValueError, match="GROKSERVE_MOE_LOOP_FROM"):
        crossover.runs_loop(1, 8, 4096, "bf16")


@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize("held", [[2, 3, 4, 5], [6, 1, 3, 4]])
def test_kernels_moe_routing_gives_each_pair_one_row_in_a_single_expert_block(block_m, held):
    experts = torch.randint(0, 8, (37, 2), generator=torch.Generator().manual_seed(block_m))
    routing = align_routing(experts, held, block_m=block_m)
    pairs = routing.sorted_pairs.long()
    flat = experts.reshape(-1)
    local = torch.isin(flat, torch.tensor(held))
    real = pairs[pairs < routing.num_pairs]
    assert sorted(real.tolist()) == torch.nonzero(local).flatten().tolist()
    for block, slot in enumerate(routing.block_expert.tolist()):
        rows = pairs[block * block_m : (block + 1) * block_m]
        rows = rows[rows < routing.num_pairs]
        if slot >= len(held):
            assert rows.numel() == 0
        else:
            assert (flat[rows] == held[slot]).all()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 64, 1000])
def test_kernels_moe_gpu_bf16_and_int8(tokens):
    from grokserve.model.kernels.moe_triton import fused_moe

    x, gates, chosen, w_gate, w_up, w_down = random_moe(tokens, 1024, 2048, 8, 7, "cuda")
    out = fused_moe(x, gates, chosen, w_gate, w_up, w_down)
    assert relative_error(out, layers.moe(x, gates, chosen, w_gate, w_up, w_down)) < 1e-2
    q = [quantize(w_gate.float()), quantize(w_up.float()), quantize(w_down.float(), 8)]
    out = fused_moe(x, gates, chosen, *q)
    ref = layers.moe(x, gates, chosen, *[w.dequantize(torch.bfloat16) for w in q])
    assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@gpu
def test_kernels_moe_gpu_decode_replays_in_a_cuda_graph():
    from grokserve.model.kernels.moe_triton import fused_moe

    x, gates, chosen, w_gate, w_up, w_down = random_moe(8, 1024, 2048, 8, 9, "cuda")
    fused_moe(x, gates, chosen, w_gate, w_up, w_down)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, gates, chosen, w_gate, w_up, w_down)
    fresh = random_moe(8, 1024, 2048, 8, 10, "cuda")
    for static, new in zip((x, gates, chosen), fresh[:3], strict=True):
        static.copy_(new)
    graph.replay()
    ref = layers.moe(x, gates, chosen, w_gate, w_up, w_down)
    assert relative_error(out, ref) < 1e-2
