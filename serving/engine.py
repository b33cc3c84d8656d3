"""The replica's request path without Ray: tokenize, admit, stream events, cancel on disconnect.

`Engine.generate` yields plain dicts so that they cross Ray (replica → ingress) unchanged:
first exactly one of
    {"error": {"status", "message", "param", "code", "retry_after", "any_request"}}
                                                                  (nothing was queued), or
    {"prompt_tokens": N, "prompt_text": str | None}               (admitted; the text with echo),
then, when admitted, {"deltas": [{"index", "text", "completion_tokens", "finish_reason",
"logprobs", "prompt_logprobs"}, ...]} with every delta that was ready (several per message when
the consumer is slower than the model). A logprob entry is {"token": id, "text", "logprob",
"top": [[text, logprob], ...]}; prompt_logprobs (echo) starts with None for the first token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from grokserve.model.config import SpecialTokens
from grokserve.model.sampling import SamplingParams
from grokserve.serving.detokenize import token_text
from grokserve.serving.requests import GenerateRequest
from grokserve.serving.scheduler import (
    AdmissionError,
    Delta,
    QueueFull,
    Scheduler,
    TokenLogprob,
)

# Texts this short tokenize in microseconds, less than a hop to a thread costs.
_INLINE_TOKENIZE_CHARS = 2048


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """The most characters one token can stand for: a text longer than this × the context limit
    cannot fit, which is checked before paying for its tokenization."""
    piece = getattr(tokenizer, "piece", None)
    if piece is None:  # byte-level: one byte (at most one character) per token
        return 1
    return max(len(piece(token)) for token in range(tokenizer.vocab_size))


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        special: SpecialTokens,
        default_max_tokens: int,
        stream_interval: float = 0.0,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.special = special
        self.default_max_tokens = default_max_tokens
        self.stream_interval = stream_interval
        self._max_prompt_chars = scheduler.max_sequence_length * max_chars_per_token(tokenizer)

    async def encode(self, text: str) -> list[int]:
        """`text`'s token ids, tokenized off the event loop (a long text never stalls the streams
        this replica is sending); a text too long for the context is refused before that."""
        if len(text) > self._max_prompt_chars:
            raise AdmissionError(
                f"the prompt has {len(text)} characters, more than fit in the context limit "
                f"(maxSequenceLength) of {self.scheduler.max_sequence_length} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return await self.encode(prompt)
        vocab, pad = self.tokenizer.vocab_size, self.special.pad
        bad = [t for t in prompt if not 0 <= t < vocab or t == pad]
        if bad:
            raise AdmissionError(
                f"prompt token ids must be in [0, {vocab - 1}] and not {pad} (padding); "
                f"got {bad[:5]}",
                param="prompt",
            )
        return list(prompt)

    def _check_token_ids(self, sampling: dict[str, Any]) -> None:
        """Token ids the sampling fields name must exist (the model step would fail on them)."""
        named = {
            "logit_bias": list(sampling.get("logit_bias", {})),
            "stop_token_ids": list(sampling.get("stop_token_ids", ())),
        }
        vocab = self.tokenizer.vocab_size
        for param, ids in named.items():
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise AdmissionError(
                    f"{param}: token ids must be in [0, {vocab - 1}]; got {bad[:5]}", param=param
                )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        try:
            self._check_token_ids(request.sampling)
            prompt = await self.prompt_ids(request.prompt)
            max_tokens = request.max_tokens
            if max_tokens is None:
                room = self.scheduler.max_sequence_length - len(prompt)
                max_tokens = max(1, min(self.default_max_tokens, room))
            generation = self.scheduler.submit(
                prompt,
                SamplingParams(**{**request.sampling, "max_tokens": max_tokens}),
                stop=request.stop,
                n=request.n,
                arrival=request.arrival,
            )
        except AdmissionError as error:
            yield {
                "error": {
                    "status": error.status,
                    "message": str(error),
                    "param": error.param,
                    "code": error.code,
                    "retry_after": error.retry_after if isinstance(error, QueueFull) else None,
                    "any_request": isinstance(error, QueueFull) and error.any_request,
                }
            }
            return
        prompt_text = None
        if request.echo:
            prompt_text = request.prompt if isinstance(request.prompt, str) else self.decode(prompt)
        yield {"prompt_tokens": generation.prompt_tokens, "prompt_text": prompt_text}
        try:
            async for ready in generation.batches(self.stream_interval):
                yield {"deltas": [self._delta(delta, prompt) for delta in ready]}
        finally:
            # The consumer went away early (client disconnect, cancellation): free the slots.
            generation.cancel()

    def _delta(self, delta: Delta, prompt_ids: list[int]) -> dict[str, Any]:
        prompt = None
        if delta.prompt_logprobs is not None:
            prompt = [
                self._logprob(entry) if entry else self._unscored(token)
                for token, entry in zip(prompt_ids, delta.prompt_logprobs, strict=True)
            ]
        return {
            "index": delta.index,
            "text": delta.text,
            "completion_tokens": delta.completion_tokens,
            "finish_reason": delta.finish_reason,
            "logprobs": [self._logprob(entry) for entry in delta.logprobs],
            "prompt_logprobs": prompt,
        }

    def _unscored(self, token: int) -> dict[str, Any]:
        """The prompt's first token: nothing before it predicts it."""
        return {
            "token": token,
            "text": token_text(self.tokenizer, token),
            "logprob": None,
            "top": None,
        }

    def _logprob(self, entry: TokenLogprob) -> dict[str, Any]:
        return {
            "token": entry.token,
            "text": token_text(self.tokenizer, entry.token),
            "logprob": entry.logprob,
            "top": [[token_text(self.tokenizer, t), value] for t, value in entry.top],
        }

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's /tokenizer_info: the tokenizer's kind and special tokens (text and id)."""
        piece = getattr(self.tokenizer, "piece", None)
        info: dict[str, Any] = {
            "tokenizer_class": type(self.tokenizer).__name__,
            "vocab_size": self.tokenizer.vocab_size,
        }
        for name, token in self.special._asdict().items():
            info[f"{name}_token"] = piece(token) if piece else f"<{name}>"
            info[f"{name}_token_id"] = token
        return info
