"""Named configurations: the released Grok-1 and small Grok-architecture models for tests and demos."""

from __future__ import annotations

import math

from grokserve.model.config import ConfigError, GrokConfig


def _small(
    vocab: int, emb: int, layers: int, q: int, kv: int, key: int, widening: float
) -> GrokConfig:
    # Same shape rules and multiplier formulas as Grok-1, scaled down.
    return GrokConfig(
        vocab_size=vocab,
        emb_size=emb,
        num_layers=layers,
        num_q_heads=q,
        num_kv_heads=kv,
        key_size=key,
        widening_factor=widening,
        num_experts=8,
        num_selected_experts=2,
        attn_output_multiplier=1 / math.sqrt(key),
        embedding_multiplier_scale=math.sqrt(emb),
        output_multiplier_scale=1 / math.sqrt(3),
        sequence_len=1024,
    )


PRESETS: dict[str, GrokConfig] = {
    "grok-1": GrokConfig(
        vocab_size=131072,
        emb_size=6144,
        num_layers=64,
        num_q_heads=48,
        num_kv_heads=8,
        key_size=128,
        widening_factor=8,
        num_experts=8,
        num_selected_experts=2,
        attn_output_multiplier=0.08838834764831845,
        embedding_multiplier_scale=78.38367176906169,
        output_multiplier_scale=0.5773502691896257,
        sequence_len=8192,
    ),
    # ~60k parameters: unit tests (4 kv heads so that 2- and 4-way tensor parallelism can be tested).
    "grok-tiny": _small(vocab=256, emb=32, layers=2, q=8, kv=4, key=8, widening=2),
    # ~3M parameters (~12 MB fp32): demos and serving tests.
    "grok-mini": _small(vocab=2048, emb=128, layers=4, q=8, kv=4, key=32, widening=2),
}


# Above this size random weights serve nothing worth the GPUs: a source is required (the operator's
# model.source rule is generated from this).
RANDOM_WEIGHTS_MAX_PARAMETERS = 10**9


def needs_source(config: GrokConfig) -> bool:
    return config.num_parameters() > RANDOM_WEIGHTS_MAX_PARAMETERS


def preset(name: str) -> GrokConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
