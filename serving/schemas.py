"""OpenAI API request/response schemas (the subset grokserve serves) and the chat prompt format."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class InvalidUnicode(ValueError):
    """A string of the request holds a lone surrogate (JSON allows one; UTF-8 cannot carry it)."""

    def __init__(self, param: str) -> None:
        super().__init__(f"{param}: invalid Unicode (a lone surrogate \\ud800-\\udfff)")
        self.param = param


class UnsupportedParameter(ValueError):
    """A parameter that would change the output and that grokserve does not implement."""

    def __init__(self, param: str) -> None:
        super().__init__(
            f"{param} is not supported by this server (it would change the output); "
            "remove it from the request"
        )
        self.param = param


def _find_lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string under `value` that is not valid Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _find_lone_surrogate(key, path) is not None:
            return path or "body"
        found = _find_lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


# Fields a client may send that do not change the output (metadata, storage, billing).
_HARMLESS_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


class ApiRequest(BaseModel):
    """Refuses invalid Unicode anywhere in the body, and every field it does not know unless its
    value is null or it is harmless: an unknown parameter might change the output."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = _find_lone_surrogate(data, "")
        if path is not None:
            raise InvalidUnicode(path)
        return data

    @model_validator(mode="after")
    def _no_unknown_parameters(self) -> ApiRequest:
        for name, value in (self.model_extra or {}).items():
            if (
                value is not None
                and name not in _HARMLESS_FIELDS
                and not self._accepts(name, value)
            ):
                raise UnsupportedParameter(name)
        return self

    def _accepts(self, name: str, value: Any) -> bool:
        """An unknown field's value that does not change the output (override per request)."""
        return False


StopField = Annotated[
    str | list[Annotated[str, Field(min_length=1)]] | None, Field(description="Up to 4 strings.")
]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(ApiRequest):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="grokserve extension; 0 disables the top-k cut.")
    stop: StopField = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # vLLM's extensions.
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit():
                raise ValueError(f"keys are token ids (as strings); got {key!r}")
        return bias

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, logprobs: int | None, prompt_logprobs: bool) -> dict[str, Any]:
        """The `SamplingParams` fields of the decoding this request asks for (the replica's
        engine builds them, resolving max_tokens)."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "stop_on_eos": not self.ignore_eos,
            "seed": self.seed,
            "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()},
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
        }


PromptField = str | list[str] | list[int] | list[list[int]]
MAX_TOP_LOGPROBS = 20


class CompletionRequest(SamplingFields):
    prompt: PromptField = Field(
        description="A string, a list of token ids, or a list of either (one choice set each)."
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=16)

    def _accepts(self, name: str, value: Any) -> bool:
        return name == "suffix" and value == ""

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: the list of prompts is empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 only scores the prompt, which needs echo: true")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
            if self.stream and self.best_of > self.n:
                raise ValueError("best_of: cannot be used with stream")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def _accepts(self, name: str, value: Any) -> bool:
        # The default output format and "no tools" change nothing.
        return (
            (name == "response_format" and value == {"type": "text"})
            or (name in ("tools", "functions") and value == [])
            or (name in ("tool_choice", "function_call") and value == "none")
        )

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be at least 1 for chat completions")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# The chat format for the base model (documented in docs/serving.md): one "Role: text" paragraph per
# message, then "Assistant:" for the model to continue; generation also stops where the model starts
# a new "User:" turn. OpenAI's "developer" role is its newer name for "system".
_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\n\nUser:"


def render_chat(messages: list[ChatMessage]) -> str:
    turns = [f"{_ROLE_NAMES[m.role]}: {m.text().strip()}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


# The same format as a Jinja chat template (GET /tokenizer_info), for clients that render chats
# themselves, such as lm-evaluation-harness with --apply_chat_template.
CHAT_TEMPLATE = (
    "{% set names = " + repr(_ROLE_NAMES) + " %}"
    "{% for message in messages %}{{ names[message['role']] }}: {{ message['content'] | trim }}"
    "{% if not loop.last or add_generation_prompt %}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TokenizeRequest(ApiRequest):
    """vLLM's POST /tokenize: a prompt or chat messages (`model` optional)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        return self


class DetokenizeRequest(ApiRequest):
    """vLLM's POST /detokenize."""

    model: str | None = None
    tokens: list[int]


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


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, list[Any]]:
    """OpenAI's completions `logprobs` for the engine's logprob events (the echoed prompt's
    first token has logprob and top None); `offset` is where the first token's text starts in
    the choice's text (0 with echo). Each top_logprobs dict holds the token itself too, as
    vLLM's do."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        tokens.append(entry["text"])
        values.append(entry["logprob"])
        top = entry["top"]
        tops.append(None if top is None else {**dict(top), entry["text"]: entry["logprob"]})
        offsets.append(offset)
        offset += len(entry["text"])
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """OpenAI's chat `logprobs` for the engine's logprob events."""

    def token(text: str, value: float) -> dict[str, Any]:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {
                **token(entry["text"], entry["logprob"]),
                "top_logprobs": [token(text, value) for text, value in entry["top"]],
            }
            for entry in entries
        ]
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_chunk_choice(
    index: int,
    text: str | None,
    finish_reason: str | None,
    *,
    first: bool,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if text:
        delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
