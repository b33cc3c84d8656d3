"""Model steps over a paged KV cache: the code every shard worker runs, and its in-process async wrapper.

`ModelStepper` owns one model (full or one SPMD shard), its paged KV cache and each row's state
(block table, cached length, sampling parameters, last sampled token). Sampling runs on the model's
device, a pure function of each row's seed and position, so for G > 1 every rank (same input, same
full logits) samples the same tokens and the replica reads rank 0's.
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
from grokserve.serving.config import ServingConfig
from grokserve.serving.loading import kv_cache_tokens
from grokserve.serving.scheduler import SamplingParams, StepInput


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
        self._lengths = [0] * max_batch_size  # tokens each row has in the cache
        self._tables: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._sampling: dict[int, SamplingParams] = {}
        self._pad_id = model.config.pad_token  # what the scheduler left-pads prefill rows with
        self._last_token = [self._pad_id] * max_batch_size  # fed to the row's next decode step
        # Rows that have had no token since they started: only their leading pad ids are padding
        # (a generated id 0 recomputed after a preemption is a real token).
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
    def run(self, step: StepInput) -> list[int]:
        for row, params in step.start.items():
            if params.seed is None:
                # A seed drawn here would differ between the ranks of a sharded replica.
                raise ValueError(f"row {row} starts without a seed; the scheduler sets one")
            self._sampling[row] = params
            self._lengths[row] = step.cached.get(row, 0)
            self._unfed.add(row)
        for row, blocks in step.blocks.items():
            self._tables[row] = blocks
        fed = step.tokens or [[self._last_token[row]] for row in step.rows]
        positions, lengths = [], []
        for row, tokens in zip(step.rows, fed, strict=True):
            pads = 0
            if row in self._unfed:
                while pads < len(tokens) and tokens[pads] == self._pad_id:
                    pads += 1
                if pads < len(tokens):
                    self._unfed.discard(row)
            real = len(tokens) - pads
            start = self._lengths[row]
            positions.append([-1] * pads + list(range(start, start + real)))
            lengths.append(start + real)
            self._lengths[row] = start + real
        device = self.cache.device
        used = blocks_for(max(lengths), self.cache.block_size)
        width = self.max_blocks if self._graphs else max(1, used)
        tables = [(self._tables[row] + [NULL_BLOCK] * width)[:width] for row in step.rows]
        inputs = [
            torch.tensor(value, dtype=torch.long, device=device)
            for value in (fed, positions, tables, lengths)
        ]
        sampling = StepSampling.of(
            [
                (p.temperature, p.top_k, p.top_p, p.seed)
                for p in (self._sampling[row] for row in step.rows)
            ],
            device,
        )
        if self._graphs is not None and step.tokens is None:
            chosen = self._graphs(*inputs, sampling)
        else:
            chosen = engine_step(self.model, self.cache, *inputs, sampling)
        if not step.sample:
            return []
        chosen = chosen.tolist()
        for row, token in zip(step.rows, chosen, strict=True):
            self._last_token[row] = token
        return chosen

    def expert_token_counts(self) -> list[list[int]] | None:
        counts = getattr(self.model, "expert_token_counts", None)
        return None if counts is None else counts().tolist()


class LocalExecutor:
    """Runs a ModelStepper on one background thread (torch releases the GIL, so the event loop
    that streams tokens keeps running during a forward)."""

    def __init__(self, stepper: ModelStepper) -> None:
        self.stepper = stepper
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-step")

    def submit(self, step: StepInput) -> Awaitable[list[int]]:
        return asyncio.get_running_loop().run_in_executor(self._thread, self.stepper.run, step)

    async def expert_token_counts(self) -> list[list[int]] | None:
        return self.stepper.expert_token_counts()

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
