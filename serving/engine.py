"""The replica's request path without Ray: tokenize, admit, stream events, cancel on disconnect.

`Engine.generate` yields plain dicts so that they cross Ray (replica → ingress) unchanged:
first exactly one of
    {"error": {"status", "message", "param", "retry_after"}}      (nothing was queued), or
    {"prompt_tokens": N}                                           (admitted),
then, when admitted, {"deltas": [{"index", "text", "completion_tokens", "finish_reason"}, ...]}
with every delta that was ready (several per message when the consumer is slower than the model).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from grokserve.serving.scheduler import AdmissionError, QueueFull, SamplingParams, Scheduler


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str | list[int]
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    n: int = 1


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        default_max_tokens: int,
        stream_interval: float = 0.0,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.default_max_tokens = default_max_tokens
        self.stream_interval = stream_interval

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 < t < vocab]
        if bad:
            raise AdmissionError(
                f"prompt token ids must be in [1, {vocab - 1}] (0 is padding); got {bad[:5]}",
                param="prompt",
            )
        return list(prompt)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        try:
            generation = self.scheduler.submit(
                self._prompt_ids(request.prompt),
                max_tokens=request.max_tokens,
                sampling=request.sampling,
                stop=request.stop,
                n=request.n,
                default_max_tokens=self.default_max_tokens,
            )
        except AdmissionError as error:
            yield {
                "error": {
                    "status": error.status,
                    "message": str(error),
                    "param": error.param,
                    "retry_after": error.retry_after if isinstance(error, QueueFull) else None,
                }
            }
            return
        yield {"prompt_tokens": generation.prompt_tokens}
        try:
            async for ready in generation.batches(self.stream_interval):
                yield {"deltas": [asdict(delta) for delta in ready]}
        finally:
            # The consumer went away early (client disconnect, cancellation): free the slots.
            generation.cancel()
