"""What the ingress sends a replica for one prompt. Torch-free: the ingress imports it, and
importing `grokserve.model` would load torch into the ingress process for nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt's request. `sampling` holds `grokserve.model.sampling.SamplingParams` fields,
    which the replica's engine builds it from; `max_tokens` None means the server's default,
    capped by the context, and replaces the params' max_tokens. `echo`: the first event carries
    the prompt's text. `arrival`: when the API received the request (wall clock)."""

    prompt: str | list[int]
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    echo: bool = False
    arrival: float = field(default_factory=time.time)
