"""Model steps over a KV cache: the code every shard worker runs, and its in-process async wrapper.

`ModelStepper` owns one model (full or one SPMD shard), its KV cache and one sampler generator per
cache row. For G > 1 every rank runs the same `run` with the same input; the sharded model returns
the full logits on every rank and the generators are seeded identically, so every rank samples the
same tokens and the replica reads rank 0's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from grokserve.model.sampling import sample
from grokserve.serving.scheduler import SamplingParams, StepInput


class ModelStepper:
    def __init__(self, model: Any, *, max_batch_size: int, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch_size=max_batch_size, max_len=max_len)
        self._generators: dict[int, torch.Generator] = {}
        self._sampling: dict[int, SamplingParams] = {}
        self._last_token: dict[int, int] = {}  # per row: fed to the row's next decode step

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[int]:
        if step.start:
            self.cache.reset(torch.tensor(list(step.start), dtype=torch.long))
            for row, params in step.start.items():
                if params.seed is None:
                    # A seed drawn here would differ between the ranks of a sharded replica.
                    raise ValueError(f"row {row} starts without a seed; the scheduler sets one")
                generator = torch.Generator()
                generator.manual_seed(params.seed)
                self._generators[row] = generator
                self._sampling[row] = params
        device = self.cache.lengths.device
        fed = step.tokens or [[self._last_token[row]] for row in step.rows]
        tokens = torch.tensor(fed, dtype=torch.long, device=device)
        rows = torch.tensor(step.rows, dtype=torch.long, device=device)
        logits = self.model(tokens, cache=self.cache, rows=rows)
        if not step.sample:
            return []
        last = logits[:, -1, :].cpu()
        # One argmax for all greedy rows; sampled rows each use their own seeded generator.
        chosen = sample(last, temperature=0).tolist()
        for i, row in enumerate(step.rows):
            params = self._sampling[row]
            if params.temperature > 0:
                chosen[i] = int(
                    sample(
                        last[i : i + 1],
                        temperature=params.temperature,
                        top_k=params.top_k,
                        top_p=params.top_p,
                        generator=self._generators[row],
                    )[0]
                )
        self._last_token.update(zip(step.rows, chosen, strict=True))
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
