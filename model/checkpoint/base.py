"""What every checkpoint reader offers, whatever the format on disk."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar, Literal

import torch

from grokserve.model.config import GrokConfig
from grokserve.model.quantization import QuantizedWeight

Format = Literal["xai", "hf", "grokserve"]
Tensor = torch.Tensor | QuantizedWeight


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, unsafe, or not matching its config."""


@dataclass(frozen=True)
class TensorInfo:
    """One parameter as stored, in our naming and `[in, out]` orientation, known without its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    scales_shape: tuple[int, ...] | None = None  # 8-bit matrices only
    scales_dtype: str | None = None

    @property
    def num_parameters(self) -> int:
        return math.prod(self.shape)


class CheckpointReader(ABC):
    """Reads one parameter at a time so that a process holds at most one tensor beyond its model.

    `names()` are our parameter names (`grokserve.model.transformer`); an 8-bit matrix is listed under
    its plain name and `read` returns it as a `QuantizedWeight` (int8 values and bf16 scales as
    stored), so that a shard can slice it before dequantising.
    """

    format: ClassVar[Format]
    config: GrokConfig
    path: Path

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def read(self, name: str) -> Tensor: ...

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and stored size from headers, without reading the tensor's data."""

    def check_name(self, name: str) -> None:
        if name not in expected_shapes(self.config):
            raise CheckpointError(
                f"{name!r} is not a parameter of this model; names look like 'layers.0.attn.wq'"
            )


@cache
def expected_shapes(config: GrokConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names (float model, `state_dict` order) and the shapes the config gives them."""
    from grokserve.model.transformer import GrokModel

    model = GrokModel(config, device="meta")
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def quantized_weight(name: str, weight: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    try:
        return QuantizedWeight(weight, scales)
    except ValueError as error:
        raise CheckpointError(f"tensor {name}: {error}") from error
