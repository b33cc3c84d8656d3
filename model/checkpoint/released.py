"""The layout xAI released: `ckpt-0/tensor{index:05d}_000`, one pickle per parameter."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from grokserve.model.checkpoint.base import (
    CheckpointError,
    CheckpointReader,
    Tensor,
    TensorInfo,
    quantized_weight,
)
from grokserve.model.checkpoint.names import released_order
from grokserve.model.checkpoint.unpickler import (
    ArrayRecord,
    QuantizedRecord,
    load_pickle,
    scan_pickle,
)
from grokserve.model.config import GrokConfig

TENSOR_FILE = re.compile(r"tensor(\d{5})_000")


def is_released_dir(path: Path) -> bool:
    return path.is_dir() and (path / "tensor00000_000").is_file()


def to_torch(array: np.ndarray) -> torch.Tensor:
    if not array.flags.writeable:  # an array over the pickle's immutable bytes
        array = array.copy()
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:  # torch cannot take ml_dtypes' bfloat16 directly
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def numpy_dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else str(dtype)


class ReleasedReader(CheckpointReader):
    format = "xai"

    def __init__(self, directory: Path, config: GrokConfig) -> None:
        self.path = directory
        self.config = config
        order = released_order(config)
        self.files = {
            ours: directory / f"tensor{index:05d}_000" for index, (_, ours) in enumerate(order)
        }
        self.reference = {ours: reference for reference, ours in order}
        if missing := [name for name, file in self.files.items() if not file.is_file()]:
            first = missing[0]
            raise CheckpointError(
                f"{directory}: {len(missing)} tensor file(s) missing, e.g. {self.files[first].name} "
                f"({self.reference[first]}); a {config.num_layers}-layer config expects "
                f"{len(order)} files (2 + 12 per layer)"
            )
        present = sum(1 for p in directory.iterdir() if TENSOR_FILE.fullmatch(p.name))
        if present != len(order):
            raise CheckpointError(
                f"{directory} holds {present} tensor files but a {config.num_layers}-layer config "
                f"expects {len(order)} (2 + 12 per layer): is config.json the checkpoint's?"
            )

    def names(self) -> list[str]:
        return list(self.files)

    def file(self, name: str) -> Path:
        self.check_name(name)
        path = self.files[name]
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file {path} ({self.reference[name]})")
        return path

    def read(self, name: str) -> Tensor:
        value = load_pickle(self.file(name))
        if isinstance(value, QuantizedRecord):
            return quantized_weight(name, to_torch(value.weight), to_torch(value.scales))
        return to_torch(value)

    def info(self, name: str) -> TensorInfo:
        value = scan_pickle(self.file(name))
        if isinstance(value, QuantizedRecord):
            weight, scales = value.weight, value.scales
            assert isinstance(weight, ArrayRecord) and isinstance(scales, ArrayRecord)
            return TensorInfo(
                name,
                weight.shape,
                numpy_dtype_name(weight.dtype),
                weight.nbytes + scales.nbytes,
                scales.shape,
                numpy_dtype_name(scales.dtype),
            )
        return TensorInfo(name, value.shape, numpy_dtype_name(value.dtype), value.nbytes)
