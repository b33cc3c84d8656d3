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

from grokserve.model.logits import adjust
from grokserve.model.sampling import SamplingParams, sample
from grokserve.serving.scheduler import RowOutput, StepInput, TokenLogprob


class ModelStepper:
    def __init__(self, model: Any, *, max_batch_size: int, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch_size=max_batch_size, max_len=max_len)
        self._special = model.config.special_tokens
        self._generators: dict[int, torch.Generator] = {}
        self._sampling: dict[int, SamplingParams] = {}
        self._prompt: dict[int, list[int]] = {}  # per row: its prompt (penalties)
        self._output: dict[int, list[int]] = {}  # per row: its sampled tokens (penalties)
        self._last_token: dict[int, int] = {}  # per row: fed to the row's next decode step

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[RowOutput]:
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
                self._prompt[row] = []
                self._output[row] = []
        device = self.cache.lengths.device
        fed = step.tokens or [[self._last_token[row]] for row in step.rows]
        if step.tokens:
            for row, chunk in zip(step.rows, step.tokens, strict=True):
                self._prompt[row].extend(t for t in chunk if t != self._special.pad)
        tokens = torch.tensor(fed, dtype=torch.long, device=device)
        rows = torch.tensor(step.rows, dtype=torch.long, device=device)
        logits = self.model(tokens, cache=self.cache, rows=rows)
        prompt = [self._prompt_logprobs(step, i, logits[i]) for i in range(len(step.rows))]
        if not step.sample:
            return [RowOutput(prompt=p) for p in prompt]
        last = logits[:, -1, :].float().cpu()
        # One argmax for all plain greedy rows; other rows each adjust and sample on their own.
        chosen = sample(last, temperature=0).tolist()
        for i, row in enumerate(step.rows):
            params = self._sampling[row]
            if params.temperature == 0 and not params.adjusts_logits:
                continue
            scores = last[i]
            if params.adjusts_logits:
                scores = adjust(
                    scores, params, self._prompt[row], self._output[row], self._special.eos
                )
            chosen[i] = int(
                sample(
                    scores[None],
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    generator=self._generators[row],
                )[0]
            )
        outputs = []
        for i, row in enumerate(step.rows):
            self._last_token[row] = chosen[i]
            self._output[row].append(chosen[i])
            wanted = self._sampling[row].logprobs
            logprob = None
            if wanted is not None:
                # The model's own distribution (vLLM's raw logprobs), before any adjustment.
                logprob = _token_logprob(torch.log_softmax(last[i], dim=-1), chosen[i], wanted)
            outputs.append(RowOutput(chosen[i], logprob, prompt[i]))
        return outputs

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
