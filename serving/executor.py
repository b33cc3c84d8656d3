"""Model steps over a paged KV cache: the code every shard worker runs, and its in-process async wrapper.

`ModelStepper` owns one model (full or one SPMD shard), its paged KV cache and each row's state
(block table, cached length, tokens, sampling parameters). Sampling runs on the model's device, a
pure function of each row's seed and position, so for G > 1 every rank (same input, same full
logits) samples the same tokens and the replica reads rank 0's.

Steps whose rows ask for nothing but tokens run `grokserve.model.engine_step` (on CUDA, decode
steps replay CUDA graphs); rows with logit adjustments (bias, penalties, min_tokens), logprobs or
prompt logprobs take their logits to the host for those, and still draw with the device sampler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from grokserve.model.blocks import DEFAULT_BLOCK_SIZE, NULL_BLOCK, blocks_for
from grokserve.model.engine_step import (
    DEFAULT_BUCKETS,
    CudaGraphDecode,
    StepSampling,
    engine_step,
)
from grokserve.model.logits import adjust
from grokserve.model.sampling import SamplingParams, sample_on_device
from grokserve.serving.config import ServingConfig
from grokserve.serving.loading import kv_cache_tokens
from grokserve.serving.scheduler import RowOutput, StepInput, TokenLogprob


class ModelStepper:
    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int,
        max_len: int,
        kv_cache_tokens: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.model = model
        self.cache = model.new_paged_cache(blocks_for(kv_cache_tokens, block_size), block_size)
        self.max_blocks = blocks_for(max_len, block_size)
        self._special = model.config.special_tokens
        self._lengths = [0] * max_batch_size  # tokens each row has in the cache
        self._tables: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._sampling: dict[int, SamplingParams] = {}
        self._seeds: dict[int, int] = {}  # each row's sampling seed, checked to be set
        self._tokens: list[list[int]] = [[] for _ in range(max_batch_size)]  # prompt, then output
        self._prompt_tokens = [0] * max_batch_size
        # Rows that have had no token since they started: only their leading pad ids are padding
        # (a generated pad id recomputed after a preemption is a real token).
        self._unfed: set[int] = set()
        self._graphs = None
        if self.cache.device.type == "cuda":
            # Buckets up to the batch limit, which is the last one: every decode batch has a graph.
            buckets = [size for size in DEFAULT_BUCKETS if size < max_batch_size]
            buckets.append(max_batch_size)
            self._graphs = CudaGraphDecode(model, self.cache, self.max_blocks, buckets)

    @classmethod
    def for_config(cls, model: Any, config: ServingConfig) -> ModelStepper:
        limits = config.serving
        return cls(
            model,
            max_batch_size=limits.max_batch_size,
            max_len=limits.max_sequence_length,
            kv_cache_tokens=kv_cache_tokens(config),
        )

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[RowOutput]:
        for row, requested in step.start.items():
            if requested.seed is None:
                # A seed drawn here would differ between the ranks of a sharded replica.
                raise ValueError(f"row {row} starts without a seed; the scheduler sets one")
            self._sampling[row], self._seeds[row] = requested, requested.seed
            cached = step.cached.get(row, [])
            self._lengths[row] = len(cached)
            self._tokens[row] = list(cached)
            self._prompt_tokens[row] = step.prompt_tokens.get(row, 0)
            self._unfed.add(row)
        for row, blocks in step.blocks.items():
            self._tables[row] = blocks
        fed = step.tokens or [[self._tokens[row][-1]] for row in step.rows]
        positions, lengths = [], []
        for row, tokens in zip(step.rows, fed, strict=True):
            pads = 0
            if row in self._unfed:
                while pads < len(tokens) and tokens[pads] == self._special.pad:
                    pads += 1
                if pads < len(tokens):
                    self._unfed.discard(row)
            start = self._lengths[row]
            real = len(tokens) - pads
            positions.append([-1] * pads + list(range(start, start + real)))
            lengths.append(start + real)
            self._lengths[row] = start + real
            if step.tokens is not None:
                self._tokens[row].extend(tokens[pads:])
        device = self.cache.device
        used = blocks_for(max(lengths), self.cache.block_size)
        width = self.max_blocks if self._graphs else max(1, used)
        tables = [(self._tables[row] + [NULL_BLOCK] * width)[:width] for row in step.rows]
        tokens_in, positions_in, tables_in, lengths_in = (
            torch.tensor(value, dtype=torch.long, device=device)
            for value in (fed, positions, tables, lengths)
        )
        inputs = (tokens_in, positions_in, tables_in, lengths_in)
        params = [self._sampling[row] for row in step.rows]
        sampling = StepSampling.of(
            [
                (p.temperature, p.top_k, p.top_p, self._seeds[row])
                for row, p in zip(step.rows, params, strict=True)
            ],
            device,
        )
        wants_prompt = step.tokens is not None and any(p.prompt_logprobs for p in params)
        on_host = wants_prompt or any(p.adjusts_logits or p.logprobs is not None for p in params)
        if not on_host:
            if self._graphs is not None and step.tokens is None:
                drawn = self._graphs(*inputs, sampling)
            else:
                drawn = engine_step(self.model, self.cache, *inputs, sampling)
            if not step.sample:
                return [RowOutput() for _ in step.rows]
            tokens = drawn.tolist()
            return [self._sampled(row, token) for row, token in zip(step.rows, tokens, strict=True)]
        logits = self.model.forward_paged(self.cache, *inputs, every_position=wants_prompt)
        prompt = [
            self._prompt_logprobs(step, i, logits[i]) if wants_prompt else ()
            for i in range(len(step.rows))
        ]
        if not step.sample:
            return [RowOutput(prompt=p) for p in prompt]
        last = (logits[:, -1] if wants_prompt else logits).float()
        scores = last.clone()
        for i, row in enumerate(step.rows):
            if params[i].adjusts_logits:
                history, cut = self._tokens[row], self._prompt_tokens[row]
                adjusted = adjust(
                    scores[i].cpu(), params[i], history[:cut], history[cut:], self._special.eos
                )
                scores[i] = adjusted.to(device)
        chosen = sample_on_device(
            scores, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds, lengths_in
        ).tolist()
        outputs = []
        for i, row in enumerate(step.rows):
            logprob, wanted = None, params[i].logprobs
            if wanted is not None:
                # The model's own distribution (vLLM's raw logprobs), before any adjustment.
                distribution = torch.log_softmax(last[i], dim=-1).cpu()
                logprob = _token_logprob(distribution, chosen[i], wanted)
            outputs.append(self._sampled(row, chosen[i], logprob, prompt[i]))
        return outputs

    def _sampled(
        self,
        row: int,
        token: int,
        logprob: TokenLogprob | None = None,
        prompt: tuple[TokenLogprob | None, ...] = (),
    ) -> RowOutput:
        self._tokens[row].append(token)  # fed to the row's next decode step
        return RowOutput(token, logprob, prompt)

    def _prompt_logprobs(
        self, step: StepInput, index: int, logits: torch.Tensor
    ) -> tuple[TokenLogprob | None, ...]:
        """Row `index`'s prompt logprobs for this chunk (empty unless its params ask for them)."""
        params = self._sampling[step.rows[index]]
        if not params.prompt_logprobs or step.tokens is None:
            return ()
        lookahead = step.lookahead[index] if step.lookahead else None
        targets = [*step.tokens[index][1:], lookahead]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        return tuple(
            None if target is None else _token_logprob(logprobs[p], target, params.logprobs or 0)
            for p, target in enumerate(targets)
        )

    def expert_token_counts(self) -> list[list[int]] | None:
        counts = getattr(self.model, "expert_token_counts", None)
        return None if counts is None else counts().tolist()


class LocalExecutor:
    """Runs a ModelStepper on one background thread (torch releases the GIL, so the event loop
    that streams tokens keeps running during a forward)."""

    def __init__(self, stepper: ModelStepper) -> None:
        self.stepper = stepper
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-step")

    def submit(self, step: StepInput) -> Awaitable[list[RowOutput]]:
        return asyncio.get_running_loop().run_in_executor(self._thread, self.stepper.run, step)

    async def expert_token_counts(self) -> list[list[int]] | None:
        return self.stepper.expert_token_counts()

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry of one position's log-softmax [V], with the `top` most likely tokens."""
    best = torch.topk(logprobs, top) if top else None
    alternatives = (
        () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    )
    return TokenLogprob(token, float(logprobs[token]), alternatives)
