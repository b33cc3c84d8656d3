"""Hugging Face ports: dequantised `[out, in]` matrices in safetensors, experts as separate tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from grokserve.model.checkpoint.base import (
    CheckpointError,
    CheckpointReader,
    TensorInfo,
    dtype_name,
    expected_shapes,
)
from grokserve.model.checkpoint.names import HF_NAMINGS, HFNaming, HFSource, hf_sources
from grokserve.model.checkpoint.safetensors_io import SafetensorsFiles, tensor_bytes
from grokserve.model.config import GrokConfig


def detect_naming(files: SafetensorsFiles) -> HFNaming:
    present = set(files.names())
    for naming in HF_NAMINGS:
        if naming.embed in present:
            return naming
    expected = " or ".join(naming.embed for naming in HF_NAMINGS)
    raise CheckpointError(
        f"{files.directory}: a Hugging Face checkpoint of Grok-1 should hold {expected}; "
        f"found names like {sorted(present)[:3]}"
    )


class HuggingFaceReader(CheckpointReader):
    format = "hf"

    def __init__(self, directory: Path, config: GrokConfig) -> None:
        self.path = directory
        self.config = config
        self.files = SafetensorsFiles(directory)
        self.naming = detect_naming(self.files)
        self.sources = hf_sources(self.naming, config)
        wanted = {name for source in self.sources.values() for name in source.names}
        present = set(self.files.names())
        if missing := sorted(wanted - present):
            raise CheckpointError(
                f"{directory}: {len(missing)} tensor(s) of a {config.num_layers}-layer, "
                f"{config.num_experts}-expert model are missing, e.g. {missing[:3]} "
                "(an incomplete checkpoint, or the wrong config?)"
            )
        if unexpected := sorted(present - wanted):
            raise CheckpointError(
                f"{directory}: {len(unexpected)} tensor(s) are not part of a "
                f"{config.num_layers}-layer model in naming {self.naming.name!r}, "
                f"e.g. {unexpected[:3]} (wrong config?)"
            )

    def names(self) -> list[str]:
        return list(expected_shapes(self.config))

    def source(self, name: str) -> HFSource:
        self.check_name(name)
        return self.sources[name]

    def read(self, name: str) -> torch.Tensor:
        source = self.source(name)
        parts = [self.files.get(part) for part in source.names]
        if source.transposed:
            parts = [part.transpose(-1, -2) for part in parts]
        if source.stacked:
            return torch.stack(parts)
        return parts[0].contiguous()

    def info(self, name: str) -> TensorInfo:
        source = self.source(name)
        headers = [self.files.header(part) for part in source.names]
        shape, dtype = headers[0]
        if source.transposed:
            shape = (*shape[:-2], shape[-1], shape[-2])
        if source.stacked:
            shape = (len(headers), *shape)
        return TensorInfo(name, shape, dtype_name(dtype), tensor_bytes(shape, dtype))
