"""The paged KV cache, its block pool and prefix cache, and the engine step with on-device sampling."""

import pytest
import torch

from grokserve.model import GrokModel
from grokserve.model.blocks import NULL_BLOCK, BlockPool
from grokserve.model.engine_step import CudaGraphDecode, StepSampling, engine_step
from grokserve.model.sampling import sample_on_device

PROMPT = [5, 17, 200, 9, 33, 41, 8, 77, 12, 13, 90, 91]


@pytest.fixture(scope="module")
def tiny() -> GrokModel:
    return GrokModel.from_preset("grok-tiny", seed=3)


def paged(model, cache, rows, tables, start):
    """Appends `rows` (left-padded to one width) to the cache at `start` tokens per row."""
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    positions = torch.tensor(
        [
            [-1] * (width - len(r)) + list(range(s, s + len(r)))
            for r, s in zip(rows, start, strict=True)
        ]
    )
    lengths = torch.tensor([s + len(r) for r, s in zip(rows, start, strict=True)])
    with torch.inference_mode():
        return model.forward_paged(cache, tokens, positions, torch.tensor(tables), lengths)


def test_scattered_blocks_prefill_and_decode_equal_the_full_forward(tiny: GrokModel) -> None:
    cache = tiny.new_paged_cache(num_blocks=32, block_size=4)
    full = tiny(torch.tensor([PROMPT]))[0]
    tables = [[9, 2, 30, 0], [4, 5, 0, 0]]  # out of order, padded with the null block
    other = PROMPT[3:8]
    logits = paged(tiny, cache, [PROMPT[:7], other], tables, [0, 0])
    torch.testing.assert_close(logits[0], full[6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], tiny(torch.tensor([other]))[0, -1], atol=1e-5, rtol=1e-5)
    for i in range(7, len(PROMPT)):
        logits = paged(tiny, cache, [[PROMPT[i]], [PROMPT[i]]], tables, [i, len(other) + i - 7])
        torch.testing.assert_close(logits[0], full[i], atol=1e-5, rtol=1e-5)
    assert not cache.keys[0][NULL_BLOCK + 1].any()  # an unlisted block was never written


def test_a_cached_prefix_gives_the_logits_of_a_full_prefill(tiny: GrokModel) -> None:
    cache = tiny.new_paged_cache(num_blocks=16, block_size=4)
    paged(tiny, cache, [PROMPT[:8]], [[3, 6, 0]], [0])
    # A second sequence shares blocks 3 and 6 (8 tokens) and computes only its own suffix.
    suffix = paged(tiny, cache, [PROMPT[8:]], [[3, 6, 1]], [8])
    full = tiny(torch.tensor([PROMPT]))[0, -1]
    torch.testing.assert_close(suffix[0], full, atol=1e-5, rtol=1e-5)


def test_compiled_engine_step_equals_eager(tiny: GrokModel) -> None:
    eager_cache = tiny.new_paged_cache(num_blocks=8, block_size=4)
    compiled_cache = tiny.new_paged_cache(num_blocks=8, block_size=4)
    tables = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    tokens = torch.tensor([PROMPT[:6], [0, 0, *PROMPT[6:10]]])
    positions = torch.tensor([list(range(6)), [0, 0, 0, 1, 2, 3]])
    lengths = torch.tensor([6, 4])
    sampling = StepSampling.of([(0.0, 0, 1.0, 0), (0.9, 20, 0.8, 7)], None)
    step = torch.compile(engine_step, fullgraph=True)
    with torch.inference_mode():
        for cache, run in ((eager_cache, engine_step), (compiled_cache, step)):
            produced = [run(tiny, cache, tokens, positions, tables, lengths, sampling)]
            for i in range(3):
                produced.append(
                    run(
                        tiny,
                        cache,
                        produced[-1][:, None],
                        lengths[:, None] + i,
                        tables,
                        lengths + i + 1,
                        sampling,
                    )
                )
            if run is engine_step:
                expected = torch.stack(produced)
        assert torch.equal(torch.stack(produced), expected)
    for layer in range(tiny.config.num_layers):
        torch.testing.assert_close(compiled_cache.keys[layer], eager_cache.keys[layer])


def test_device_sampling_greedy_top_k_top_p_and_seeds() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    rows = len(logits)

    def draw(temperature=1.0, top_k=0, top_p=1.0, seed=1, position=0):
        return sample_on_device(
            logits,
            torch.full((rows,), temperature),
            torch.full((rows,), top_k),
            torch.full((rows,), top_p),
            torch.full((rows,), seed),
            torch.full((rows,), position),
        )

    greedy = logits.argmax(-1)
    tie = torch.tensor([[0.0, 2.0, 1.0, 2.0]])
    zero, one = torch.zeros(1, dtype=torch.long), torch.ones(1)
    assert (
        int(sample_on_device(tie, zero.float(), zero, one, zero, zero)) == 1
    )  # lowest of equal maxima
    assert torch.equal(draw(temperature=0), greedy)
    assert torch.equal(draw(top_k=1), greedy)
    assert torch.equal(draw(top_p=1e-6), greedy)
    assert torch.equal(draw(seed=5, position=9), draw(seed=5, position=9))
    draws = torch.stack([draw(temperature=5.0, top_k=3, position=p) for p in range(100)])
    top3 = logits.topk(3).indices
    assert all(set(draws[:, r].tolist()) == set(top3[r].tolist()) for r in range(rows))


def test_device_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    n = len(logits)
    drawn = sample_on_device(
        logits,
        torch.ones(n),
        torch.zeros(n, dtype=torch.long),
        torch.ones(n),
        torch.arange(n),
        torch.zeros(n, dtype=torch.long),
    )
    frequencies = torch.bincount(drawn, minlength=4).float() / n
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), atol=0.03, rtol=0)


def test_block_pool_admits_by_blocks_and_shares_cached_prefixes() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    first = pool.allocate(PROMPT, total_tokens=14)  # 12 prompt tokens + 2 generated: 4 blocks
    assert first is not None and len(first.blocks) == 4 and first.cached_tokens == 0
    assert NULL_BLOCK not in first.blocks
    assert pool.allocate(PROMPT, total_tokens=14) is None  # 2 free blocks, even counting a hit
    pool.cache_full_blocks(first, PROMPT)
    second = pool.allocate(PROMPT, total_tokens=13)
    # The last token's block is never taken from the cache: 8 of 12 prompt tokens hit.
    assert second is not None and second.cached_tokens == 8
    assert second.blocks[:2] == first.blocks[:2] and pool.available == 0
    assert (pool.query_tokens, pool.hit_tokens) == (24, 8)
    assert not pool.grow(second, 17)
    pool.free(first)
    pool.free(second)
    assert pool.available == 6
    # Unreferenced cached blocks stay hits until evicted, tail first.
    third = pool.allocate(PROMPT, total_tokens=12)
    assert third.cached_tokens == 8
    pool.free(third)
    fourth = pool.allocate([1, 2, 3, 4] * 5, total_tokens=20)  # 5 blocks: evicts 2 cached ones
    assert fourth is not None
    assert pool.allocate(PROMPT, total_tokens=12) is None
    pool.free(fourth)
    # The tail went first: the prompt's first block is still a hit.
    assert pool.allocate(PROMPT, total_tokens=12).cached_tokens == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_per_bucket() -> None:
    model = GrokModel.from_preset("grok-tiny", seed=3)
    model = model.astype(model.dtype).to("cuda")
    cache = model.new_paged_cache(num_blocks=64, block_size=4)
    graphs = CudaGraphDecode(model, cache, max_blocks=4, buckets=(1, 4, 8))
    for batch in (1, 3, 8):
        tables = torch.arange(1, 4 * batch + 1, device="cuda").view(batch, 4)
        prompt = torch.tensor([PROMPT[:5]] * batch, device="cuda")
        positions = torch.arange(5, device="cuda").expand(batch, 5)
        lengths = torch.full((batch,), 5, device="cuda")
        sampling = StepSampling.greedy(batch, "cuda")
        with torch.inference_mode():
            token = engine_step(model, cache, prompt, positions, tables, lengths, sampling)
            eager = engine_step(
                model, cache, token[:, None], lengths[:, None], tables, lengths + 1, sampling
            )
            captured = graphs(token[:, None], lengths[:, None], tables, lengths + 1, sampling)
        assert torch.equal(captured, eager)


def test_dense_moe_computes_what_the_expert_loop_computes() -> None:
    from grokserve.model import layers

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(10, 16, generator=generator).bfloat16()
    w_gate, w_up = (torch.randn(4, 16, 24, generator=generator).bfloat16() for _ in range(2))
    w_down = torch.randn(4, 24, 16, generator=generator).bfloat16()
    gates, experts = layers.route(x, torch.randn(16, 6, generator=generator), 2)
    ids = [5, 0, 2, 3]  # a shard's experts, in its own order; tokens routed elsewhere get nothing
    dense = layers.moe_dense(x, gates, experts, w_gate, w_up, w_down, ids)
    loop = layers.moe(x, gates, experts, w_gate, w_up, w_down, ids)
    torch.testing.assert_close(dense, loop, atol=0, rtol=1 / 128)
