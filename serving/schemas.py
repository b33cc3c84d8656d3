"""OpenAI API request/response schemas (the subset grokserve serves) and the chat prompt format."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Extra fields (logprobs=None, frequency_penalty=0, user=...) are accepted and ignored, as OpenAI
# clients send some of them by default.
_REQUEST_CONFIG = ConfigDict(extra="allow")

StopField = Annotated[
    str | list[Annotated[str, Field(min_length=1)]] | None, Field(description="Up to 4 strings.")
]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = _REQUEST_CONFIG

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="grokserve extension; 0 disables the top-k cut.")
    stop: StopField = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stop

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] = Field(
        description="One prompt: a string, a list of token ids, or a list with one string."
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError("only one prompt per request is supported; send one request each")
        return prompt

    def prompt_input(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# The chat format for the base model (documented in docs/serving.md): one "Role: text" paragraph per
# message, then "Assistant:" for the model to continue; generation also stops where the model starts
# a new "User:" turn.
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\n\nUser:"


def render_chat(messages: list[ChatMessage]) -> str:
    turns = [f"{_ROLE_NAMES[m.role]}: {m.text().strip()}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


# -- responses ----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "grokserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_chunk_choice(
    index: int, text: str | None, finish_reason: str | None, *, first: bool
) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if text:
        delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
