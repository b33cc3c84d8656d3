"""Safetensors files read lazily (headers first, one tensor at a time) and written one tensor at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

from grokserve.model.checkpoint.base import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFiles:
    """The tensors of one checkpoint directory: `model.safetensors`, or shards listed by the index."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            self.file_of = self.read_index(index)
        elif (directory / "model.safetensors").is_file():
            single = directory / "model.safetensors"
            self.file_of = dict.fromkeys(self.open(single).keys(), single)
        else:
            raise CheckpointError(
                f"{directory}: no model.safetensors or {INDEX_FILE} beside config.json"
            )
        self.handles: dict[Path, safe_open] = {}

    def read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map") from error
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files")
        files = {
            name: self.directory / shard_path(index, name, file)
            for name, file in weight_map.items()
        }
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise CheckpointError(f"missing checkpoint shard {path} (listed in {index})")
        return files

    @staticmethod
    def open(path: Path) -> safe_open:
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error

    def handle(self, name: str) -> safe_open:
        try:
            path = self.file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor {name!r}") from None
        if path not in self.handles:
            self.handles[path] = self.open(path)
        return self.handles[path]

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.handle(name).get_tensor(name)
        except SafetensorError as error:
            raise CheckpointError(f"{self.file_of[name]}: cannot read {name} ({error})") from error

    def header(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        view = self.handle(name).get_slice(name)
        return tuple(view.get_shape()), DTYPES[view.get_dtype()]


def shard_path(index: Path, name: str, file: object) -> PurePosixPath:
    """The index's entry as a path inside the checkpoint directory.

    The index is untrusted input: `../` or an absolute path would read any file on the machine as
    weights. Checked by name, not by resolving, because Hugging Face cache snapshots are symlinks into
    a blob directory outside the checkpoint.
    """
    path = PurePosixPath(file) if isinstance(file, str) else None
    if path is None or not path.parts or path.is_absolute() or ".." in path.parts:
        raise CheckpointError(
            f"{index}: weight_map entry {name!r} -> {file!r} must be a file name inside the "
            "checkpoint directory"
        )
    return path


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Writes the file tensor by tensor (`safetensors.torch.save_file` serialises all at once)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(f"{name}: safetensors cannot hold dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            file.write(flat.view(torch.uint8).numpy().data)
    os.replace(partial, path)
