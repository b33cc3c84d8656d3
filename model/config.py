"""Grok-1 configuration under the reference's field names (`run.py`), plus readers for other spellings.

Every multiplier is a field: an implementation must read them from the config, never derive them from
the embedding or head size (grok1-spec.md §1).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple


class SpecialTokens(NamedTuple):
    """The ids a tokenizer, the scheduler and the model must agree on; they come from the config."""

    pad: int
    bos: int
    eos: int


class ConfigError(ValueError):
    """A configuration that cannot describe a working Grok model; the message names the field."""


@dataclass(frozen=True)
class GrokConfig:
    vocab_size: int
    emb_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    key_size: int
    widening_factor: float
    num_experts: int
    num_selected_experts: int
    attn_output_multiplier: float
    embedding_multiplier_scale: float
    output_multiplier_scale: float
    rms_norm_eps: float = 1e-5
    max_attn_value: float = 30.0
    rope_theta: float = 10000.0
    pad_token: int = 0
    bos_token: int = 1
    eos_token: int = 2
    sequence_len: int = 8192

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ffn_size(self) -> int:
        """Expert hidden size F: int(w·D)·2//3 rounded up to a multiple of 8 (the reference's rule)."""
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (8 - size) % 8

    @property
    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens(pad=self.pad_token, bos=self.bos_token, eos=self.eos_token)

    @property
    def q_heads_per_kv_head(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "emb_size",
            "num_layers",
            "num_q_heads",
            "num_kv_heads",
            "key_size",
            "num_experts",
            "num_selected_experts",
            "sequence_len",
        ):
            check_integer(name, getattr(self, name), minimum=1)
        for name in ("pad_token", "bos_token", "eos_token"):
            check_integer(name, getattr(self, name), minimum=0)
        for name in ("widening_factor", "rms_norm_eps", "max_attn_value", "rope_theta"):
            if not check_number(name, getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in (
            "attn_output_multiplier",
            "embedding_multiplier_scale",
            "output_multiplier_scale",
        ):
            if check_number(name, getattr(self, name)) == 0:
                raise ConfigError(f"{name} must be a finite non-zero number, got 0")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): each kv head serves the same number of query heads"
            )
        if self.key_size % 2:
            raise ConfigError(f"key_size must be even for rotate-half RoPE, got {self.key_size}")
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(
                f"num_selected_experts ({self.num_selected_experts}) cannot exceed num_experts "
                f"({self.num_experts})"
            )
        for name in ("pad_token", "bos_token", "eos_token"):
            token = getattr(self, name)
            if not 0 <= token < self.vocab_size:
                raise ConfigError(
                    f"{name} ({token}) must be a token id below vocab_size ({self.vocab_size})"
                )
        if self.ffn_size <= 0:
            raise ConfigError(
                f"widening_factor {self.widening_factor} gives an empty expert hidden size"
            )

    def num_parameters(self) -> int:
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        attention = d * self.key_size * (2 * self.num_q_heads + 2 * self.num_kv_heads)
        per_layer = attention + d * e + 3 * e * d * f + 4 * d
        return self.vocab_size * d + d + self.num_layers * per_layer

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrokConfig:
        """Reads the reference's names, flat or nested as in `run.py` (`model=TransformerConfig(...)`)."""
        flat = dict(data)
        nested = flat.pop("model", None)
        if isinstance(nested, dict):
            flat.update(nested)
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - flat.keys())
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        return cls(**{k: v for k, v in flat.items() if k in known})

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> GrokConfig:
        """Reads a Hugging Face `config.json` of the Grok-1 ports (grok1-spec.md §3)."""

        def lookup(names: tuple[str, ...], default: Any) -> tuple[str, Any]:
            for name in names:
                if name in data:
                    return name, data[name]
            if default is MISSING:
                raise ConfigError(f"Hugging Face config is missing {' or '.join(names)}")
            return names[0], default

        # Checked under the file's own names before any arithmetic, so that a bad value is reported
        # as the field the user wrote rather than as a division by zero further on.
        def integer(*names: str, default: Any = MISSING, minimum: int = 1) -> int:
            return check_integer(*lookup(names, default), minimum=minimum)

        def number(name: str, default: Any = MISSING) -> float:
            return float(check_number(*lookup((name,), default)))

        hidden = integer("hidden_size")
        heads = integer("num_attention_heads")
        intermediate = integer("intermediate_size")
        # Several ports write `head_dim: null` to mean "derive it".
        head_dim = data.get("head_dim")
        config = cls(
            vocab_size=integer("vocab_size"),
            emb_size=hidden,
            num_layers=integer("num_hidden_layers"),
            num_q_heads=heads,
            num_kv_heads=integer("num_key_value_heads"),
            key_size=hidden // heads if head_dim is None else integer("head_dim"),
            widening_factor=intermediate * 3 / 2 / hidden,
            num_experts=integer("num_experts", "num_local_experts"),
            num_selected_experts=integer("num_experts_per_tok"),
            attn_output_multiplier=number("attn_output_multiplier"),
            embedding_multiplier_scale=number("embedding_multiplier_scale"),
            output_multiplier_scale=number("output_multiplier_scale"),
            rms_norm_eps=number("rms_norm_eps", 1e-5),
            max_attn_value=number("max_attn_value", 30.0),
            rope_theta=number("rope_theta", 10000.0),
            pad_token=integer("pad_token_id", default=0, minimum=0),
            bos_token=integer("bos_token_id", default=1, minimum=0),
            eos_token=integer("eos_token_id", default=2, minimum=0),
            sequence_len=integer("max_position_embeddings", default=8192),
        )
        if config.ffn_size != intermediate:
            raise ConfigError(
                f"intermediate_size {intermediate} is not reachable by the reference's rounding rule "
                f"from hidden_size {hidden} (it gives {config.ffn_size})"
            )
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> GrokConfig:
        """A `config.json` in either spelling: Hugging Face's if it has `hidden_size`."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data) if "hidden_size" in data else cls.from_dict(data)


def check_integer(name: str, value: Any, minimum: int) -> int:
    # JSON gives bools and strings as readily as ints; coercing "6144" or 8.5 would hide a broken file.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")
    return value


def check_number(name: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return value
