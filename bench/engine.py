"""The paged KV cache on the CPU, in one run: step speed, admission at a fixed budget, prefix reuse.

    python bench/engine.py [--preset grok-mini] [--context 512] [--batch 16 64] [--threads 1]

1. Decode step time, paged (`GrokModel.forward_paged` through block tables of scattered blocks) against
   contiguous (`GrokModel.forward` over `KVCache` rows), every row holding `--context` tokens; prints
   contiguous ms / paged ms (target >= 0.9).
2. Sequences that run at once in a fixed KV budget (`--budget` tokens, `--max-len` context) for a
   length mix like chat traffic (log-normal prompt and output lengths, medians 200 and 120 tokens,
   capped at the context): max_len rows hold budget / max_len of them; the paged cache holds as many
   as their blocks allow when every sequence is grown to its full length.
3. Prefill tokens computed for `--requests` requests, one after another, sharing a 1024-token prefix
   (a system prompt) with 16 tokens each of their own, through the real scheduler and model: the
   requests after the first (prefix-cache hits) against their prompt tokens (target: >= 90 % fewer).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import torch

from grokserve.model import GrokModel
from grokserve.model.blocks import DEFAULT_BLOCK_SIZE, BlockPool, blocks_for
from grokserve.model.sampling import SamplingParams
from grokserve.serving.executor import LocalExecutor, ModelStepper
from grokserve.serving.loading import ByteTokenizer
from grokserve.serving.scheduler import Scheduler


def median_ms(steps, repeats: int) -> list[float]:
    """Median ms of each step, the steps interleaved so that other load on the machine hits all."""
    times: list[list[float]] = [[] for _ in steps]
    for step in steps:
        step()  # warm-up
    for _ in range(repeats):
        for step, spent in zip(steps, times, strict=True):
            start = time.perf_counter()
            step()
            spent.append(time.perf_counter() - start)
    return [1000 * statistics.median(spent) for spent in times]


@torch.inference_mode()
def decode_step_ratio(
    model: GrokModel, batch: int, context: int, repeats: int
) -> tuple[float, float]:
    """(contiguous ms, paged ms) of one decode step with `context` tokens cached per row."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, model.config.vocab_size, (batch, 1), generator=generator)

    contiguous = model.new_cache(batch, context)
    for keys, values in zip(contiguous.keys, contiguous.values, strict=True):
        keys.normal_(generator=generator)
        values.normal_(generator=generator)
    contiguous.key_valid[:, : context - 1] = True

    def contiguous_step() -> None:
        contiguous.lengths.fill_(context - 1)
        model(tokens, contiguous)

    per_row = blocks_for(context, DEFAULT_BLOCK_SIZE)
    paged = model.new_paged_cache(batch * per_row)
    for keys, values in zip(paged.keys, paged.values, strict=True):
        keys.normal_(generator=generator)
        values.normal_(generator=generator)
    # Scattered blocks, as a pool hands them out after some traffic.
    tables = (torch.randperm(batch * per_row, generator=generator) + 1).view(batch, per_row)
    positions = torch.full((batch, 1), context - 1)
    lengths = torch.full((batch,), context)

    def paged_step() -> None:
        model.forward_paged(paged, tokens, positions, tables, lengths)

    contiguous_ms, paged_ms = median_ms([contiguous_step, paged_step], repeats)
    return contiguous_ms, paged_ms


def admitted_at_budget(budget: int, max_len: int, count: int = 2000) -> tuple[int, float]:
    """(max_len rows, mean sequences the paged cache holds at their full length) for the mix."""
    rng = random.Random(0)
    pool_sizes = []
    lengths = []
    for _ in range(count):
        prompt = min(max_len - 1, max(1, round(rng.lognormvariate(5.3, 0.9))))  # median ~200
        output = min(max_len - prompt, max(1, round(rng.lognormvariate(4.8, 0.8))))  # ~120
        lengths.append(prompt + output)
    # Fill a fresh pool from successive windows of the mix until a sequence no longer fits.
    start = 0
    while start < count:
        pool = BlockPool(blocks_for(budget, DEFAULT_BLOCK_SIZE), DEFAULT_BLOCK_SIZE, False)
        held = 0
        while start < count and pool.allocate([1], lengths[start]) is not None:
            held += 1
            start += 1
        pool_sizes.append(held)
        start += 1
    return budget // max_len, statistics.mean(pool_sizes)


async def prefill_tokens_with_shared_prefix(
    model: GrokModel, requests: int
) -> list[tuple[int, int]]:
    """(prompt tokens, prefill tokens computed) of each request sharing a 1024-token prefix."""
    computed = 0

    class Counting(LocalExecutor):
        def submit(self, step):
            nonlocal computed
            if step.tokens is not None:
                # Left padding (id 0) is not computed for anything a sequence keeps.
                computed += sum(token != 0 for row in step.tokens for token in row)
            return super().submit(step)

    stepper = ModelStepper(model, max_batch_size=4, max_len=2048, kv_cache_tokens=4096)
    executor = Counting(stepper)
    tokenizer = ByteTokenizer(model.config.vocab_size, model.config.special_tokens)
    scheduler = Scheduler(
        executor,
        tokenizer,
        max_batch_size=4,
        max_sequence_length=2048,
        max_queued_requests=requests,
        kv_budget=4096,
        prefill_chunk_tokens=512,
        eos_id=None,
        pad_id=model.config.pad_token,
    )
    rng = random.Random(1)
    prefix = [rng.randrange(4, model.config.vocab_size) for _ in range(1024)]
    prompts = [prefix + [rng.randrange(4, 200) for _ in range(16)] for _ in range(requests)]
    counts = []
    scheduler.start()
    try:
        for prompt in prompts:
            before = computed
            generation = scheduler.submit(prompt, SamplingParams(temperature=0, max_tokens=4))
            async for _ in generation:
                pass
            counts.append((len(prompt), computed - before))
    finally:
        await scheduler.stop()
        executor.close()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="grok-mini")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=int, default=65536, help="KV budget in tokens")
    parser.add_argument("--max-len", type=int, default=4096, help="context limit (max_len rows)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = GrokModel.from_preset(args.preset, seed=0)
    print(f"# {args.preset}, CPU, {torch.get_num_threads()} threads")

    print(f"\n## decode step, {args.context}-token contexts\n")
    print("| batch | contiguous ms | paged ms | contiguous / paged (target >= 0.9) |")
    print("| --- | --- | --- | --- |")
    for batch in args.batch:
        contiguous_ms, paged_ms = decode_step_ratio(model, batch, args.context, args.repeats)
        print(
            f"| {batch} | {contiguous_ms:.2f} | {paged_ms:.2f} | {contiguous_ms / paged_ms:.2f} |"
        )

    rows, held = admitted_at_budget(args.budget, args.max_len)
    print(f"\n## sequences at once in {args.budget} KV tokens (context {args.max_len})\n")
    print(
        f"max_len rows: {rows}; paged, every sequence at full length: {held:.1f} "
        f"({held / rows:.1f}x)"
    )

    counts = asyncio.run(prefill_tokens_with_shared_prefix(model, args.requests))
    (first_prompt, first_computed), hits = counts[0], counts[1:]
    prompt_tokens, computed = (sum(column) for column in zip(*hits, strict=True))
    print(f"\n## prefill with a shared 1024-token prefix, {args.requests} requests\n")
    print(f"first request: {first_computed} of {first_prompt} prompt tokens computed")
    print(
        f"the {len(hits)} after it: {computed} of {prompt_tokens} computed, "
        f"{100 * (1 - computed / prompt_tokens):.1f} % fewer (target >= 90 %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
