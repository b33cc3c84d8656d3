"""Our own format: `config.json` (our field names) and `model.safetensors` in our parameter names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from grokserve.model.checkpoint.base import (
    CheckpointError,
    CheckpointReader,
    Tensor,
    TensorInfo,
    dtype_name,
    expected_shapes,
    quantized_weight,
)
from grokserve.model.checkpoint.safetensors_io import (
    SafetensorsFiles,
    tensor_bytes,
    write_safetensors,
)
from grokserve.model.config import GrokConfig

if TYPE_CHECKING:
    from grokserve.model.transformer import GrokModel

FORMAT_TAG = "grokserve"


def save_pretrained(model: GrokModel, path: str | Path) -> Path:
    """Writes `model` (float or int8) as `config.json` + `model.safetensors`; returns the directory."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json(directory / "config.json")
    metadata = {"format": FORMAT_TAG, "quantization": model.quantization or "none"}
    write_safetensors(directory / "model.safetensors", model.state_dict(), metadata)
    return directory


class NativeReader(CheckpointReader):
    """int8 matrices are stored as `<name>.weight` and `<name>.scales`, and read as QuantizedWeight."""

    format = "grokserve"

    def __init__(self, directory: Path, config: GrokConfig) -> None:
        self.path = directory
        self.config = config
        self.files = SafetensorsFiles(directory)
        stored = set(self.files.names())
        self.quantized = {
            key.removesuffix(".scales")
            for key in stored
            if key.endswith(".scales") and key.removesuffix(".scales") + ".weight" in stored
        }
        plain = stored - {
            f"{name}.{part}" for name in self.quantized for part in ("weight", "scales")
        }
        listed = plain | self.quantized
        expected = expected_shapes(config)
        if missing := [name for name in expected if name not in listed]:
            raise CheckpointError(
                f"{directory}: {len(missing)} parameter(s) are missing, e.g. {missing[:3]}"
            )
        if unexpected := sorted(listed - expected.keys()):
            raise CheckpointError(
                f"{directory}: {len(unexpected)} tensor(s) are not parameters of a "
                f"{config.num_layers}-layer model, e.g. {unexpected[:3]} (wrong config?)"
            )

    def names(self) -> list[str]:
        return list(expected_shapes(self.config))

    def read(self, name: str) -> Tensor:
        self.check_name(name)
        if name in self.quantized:
            return quantized_weight(
                name, self.files.get(f"{name}.weight"), self.files.get(f"{name}.scales")
            )
        return self.files.get(name)

    def info(self, name: str) -> TensorInfo:
        self.check_name(name)
        if name in self.quantized:
            shape, dtype = self.files.header(f"{name}.weight")
            scales_shape, scales_dtype = self.files.header(f"{name}.scales")
            return TensorInfo(
                name,
                shape,
                dtype_name(dtype),
                tensor_bytes(shape, dtype) + tensor_bytes(scales_shape, scales_dtype),
                scales_shape,
                dtype_name(scales_dtype),
            )
        shape, dtype = self.files.header(name)
        return TensorInfo(name, shape, dtype_name(dtype), tensor_bytes(shape, dtype))
