"""Build a replica's model shard and tokenizer from the serving config's `model` section."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from grokserve.model import GrokConfig, GrokModel, preset
from grokserve.model.tokenizer import Tokenizer
from grokserve.serving.config import ModelSpec, ServingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Ids below this are Grok's special tokens ([PAD], [BOS], [EOS], [UNK]).
_SPECIAL_IDS = 4


class ByteTokenizer:
    """UTF-8 bytes as ids 4..259, for models that ship without a SentencePiece file.

    With a 256-entry vocabulary (grok-tiny) bytes 0xFC..0xFF have no id; they never occur in
    valid UTF-8, so every text still round-trips.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [
            byte + _SPECIAL_IDS
            for byte in text.encode("utf-8")
            if byte + _SPECIAL_IDS < self.vocab_size
        ]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - _SPECIAL_IDS for i in ids if _SPECIAL_IDS <= i < _SPECIAL_IDS + 256)
        return data.decode("utf-8", errors="replace")


def model_config(spec: ModelSpec) -> GrokConfig:
    return preset(spec.preset)


def local_path(location: str) -> Path:
    """A checkpoint or tokenizer location as a local path (plain paths and file:// URLs)."""
    if location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise ValueError(
            f"{location}: the {scheme}:// scheme must be mounted or downloaded to a local path "
            "before the replica starts (the operator mounts pvc:// sources)"
        )
    return Path(location)


def load_tokenizer(spec: ModelSpec) -> Tokenizer | ByteTokenizer:
    if spec.tokenizer is None:
        return ByteTokenizer(model_config(spec).vocab_size)
    return Tokenizer(local_path(spec.tokenizer))


def load_shard(config: ServingConfig, rank: int, world_size: int) -> GrokModel:
    """This rank's model: the whole model for G = 1."""
    if world_size > 1:
        raise NotImplementedError(
            f"parallelism with {world_size} shards needs the sharded model (placement branch)"
        )
    spec = config.model
    if spec.source is not None:
        raise NotImplementedError("loading checkpoints is not wired yet")
    model = GrokModel.from_preset(spec.preset, seed=spec.seed, dtype=DTYPES[spec.dtype])
    if spec.quantization == "int8":
        model = model.quantized()
    if config.resources.device == "cuda":
        model = model.to("cuda")
    return model


def placement_plan(config: ServingConfig) -> dict[str, Any] | None:
    """The placement plan of one replica (which rank holds which heads and experts)."""
    return None
