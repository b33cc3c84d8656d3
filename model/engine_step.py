"""The serving engine's model step: tokens in, next token ids out, all on the model's device.

`engine_step` runs one paged forward (a prefill chunk or a decode step) and samples each row's next
token; `StepSampling` holds the per-row sampling parameters as tensors. The call reads nothing back
to the host and no shape depends on the data, so it compiles whole
(`torch.compile(engine_step, fullgraph=True)`) and `CudaGraphDecode` captures its decode form
(one token per row) as one CUDA graph per batch-size bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from grokserve.model.blocks import NULL_BLOCK
from grokserve.model.paged import PagedKVCache
from grokserve.model.sampling import sample_on_device

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

    from grokserve.model.transformer import GrokModel

# Batch sizes a captured decode step is recorded for; a batch runs in the smallest bucket that holds it.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class StepSampling:
    """Per-row sampling parameters, each a tensor [B] on the model's device.

    temperature float32 (0: greedy), top_k int64 (0: off), top_p float32 (1: off), seeds int64."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor

    @classmethod
    def greedy(cls, batch: int, device: torch.device | str | None = None) -> StepSampling:
        return cls.of([(0.0, 0, 1.0, 0)] * batch, device)

    @classmethod
    def of(
        cls, rows: Sequence[tuple[float, int, float, int]], device: torch.device | str | None
    ) -> StepSampling:
        """From (temperature, top_k, top_p, seed) per row."""
        temperature, top_k, top_p, seeds = zip(*rows, strict=True) if rows else ((), (), (), ())
        return cls(
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(top_k, dtype=torch.long, device=device),
            torch.tensor(top_p, dtype=torch.float32, device=device),
            torch.tensor(seeds, dtype=torch.long, device=device),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def engine_step(
    model: GrokModel,
    cache: PagedKVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    sampling: StepSampling,
) -> torch.Tensor:
    """One step (see `GrokModel.forward_paged` for the inputs) -> next token id per row [B].

    The token drawn for a row sits at position `lengths[row]`; its random draw depends only on the
    row's seed and that position."""
    logits = model.forward_paged(cache, tokens, positions, block_tables, lengths)
    return sample_on_device(
        logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds, lengths
    )


class CudaGraphDecode:
    """Decode steps (one token per row) replayed from CUDA graphs, one graph per batch bucket.

    Inputs are copied into the bucket's static buffers; unused rows decode a pad token into the null
    block and are dropped. Block tables must have `max_blocks` columns. Capture happens on first use
    of a bucket (or `capture_all`)."""

    def __init__(
        self,
        model: GrokModel,
        cache: PagedKVCache,
        max_blocks: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
    ) -> None:
        if cache.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the cache on a CUDA device, it is on {cache.device}"
            )
        self.model, self.cache, self.max_blocks = model, cache, max_blocks
        self.buckets = sorted(buckets)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self._pool: _POOL_HANDLE | None = None

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest CUDA-graph bucket {self.buckets[-1]}")

    def capture_all(self) -> None:
        for size in self.buckets:
            self._capture(size)

    def _capture(self, batch: int) -> None:
        device, pad = self.cache.device, self.model.config.pad_token
        inputs = [
            torch.full((batch, 1), pad, dtype=torch.long, device=device),  # tokens
            torch.full((batch, 1), -1, dtype=torch.long, device=device),  # positions: padding
            torch.full((batch, self.max_blocks), NULL_BLOCK, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),  # lengths
            *StepSampling.greedy(batch, device).tensors(),
        ]

        def run() -> torch.Tensor:
            tokens, positions, block_tables, lengths = inputs[:4]
            return engine_step(
                self.model,
                self.cache,
                tokens,
                positions,
                block_tables,
                lengths,
                StepSampling(*inputs[4:]),
            )

        # Warm up on a side stream (lazy inits, autotuning), as torch.cuda.graph requires.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = run()
        self._pool = graph.pool()
        self._graphs[batch] = (graph, inputs, output)

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        sampling: StepSampling,
    ) -> torch.Tensor:
        batch, pad = tokens.shape[0], self.model.config.pad_token
        size = self.bucket(batch)
        if size not in self._graphs:
            self._capture(size)
        graph, inputs, output = self._graphs[size]
        given = [tokens, positions, block_tables, lengths, *sampling.tensors()]
        for static, value in zip(inputs, given, strict=True):
            static[:batch].copy_(value)
        # Rows past the batch: padding (position -1) into the null block, nothing visible.
        inputs[0][batch:] = pad
        inputs[1][batch:] = -1
        inputs[2][batch:] = NULL_BLOCK
        inputs[3][batch:] = 0
        graph.replay()
        return output[:batch].clone()
