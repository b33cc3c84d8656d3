"""Model shapes the operator needs for validation, without importing the model package (no torch).

The values mirror `grokserve.model.presets.PRESETS`; a test keeps the two tables in step.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    """snake_case in Python, camelCase in YAML (the custom resource's spelling); both accepted."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ModelShape(CamelModel):
    """The few model dimensions that decide how a replica can be split across GPUs."""

    num_q_heads: int = Field(ge=1, description="Attention query heads.")
    num_kv_heads: int = Field(
        ge=1, description="Attention key/value heads; tensor parallelism must divide them."
    )
    num_experts: int = Field(ge=1, description="Experts per MoE layer.")
    num_layers: int = Field(ge=1, description="Transformer layers.")
    emb_size: int = Field(ge=1, description="Embedding (model) width.")
    sequence_len: int = Field(
        default=8192, ge=1, description="Longest context (tokens) the model was built for."
    )


PRESET_SHAPES: dict[str, ModelShape] = {
    "grok-1": ModelShape(
        num_q_heads=48,
        num_kv_heads=8,
        num_experts=8,
        num_layers=64,
        emb_size=6144,
        sequence_len=8192,
    ),
    "grok-tiny": ModelShape(
        num_q_heads=8, num_kv_heads=4, num_experts=8, num_layers=2, emb_size=32, sequence_len=1024
    ),
    "grok-mini": ModelShape(
        num_q_heads=8, num_kv_heads=4, num_experts=8, num_layers=4, emb_size=128, sequence_len=1024
    ),
}
