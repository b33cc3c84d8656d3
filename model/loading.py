"""`load_model`: a GrokModel from any checkpoint format, filled one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from grokserve.model.checkpoint import CheckpointError, open_checkpoint
from grokserve.model.checkpoint.base import Tensor
from grokserve.model.config import GrokConfig
from grokserve.model.quantization import QuantizedWeight, quantize
from grokserve.model.transformer import GrokModel, Quantization

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Checkpoints with more parameters than this show a progress bar while they load.
PROGRESS_FROM_PARAMETERS = 500_000_000


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    config: GrokConfig | str | Path | None = None,
    quantization: Quantization = None,
    progress: bool | None = None,
) -> GrokModel:
    """Loads a checkpoint of any supported format (detected) into a GrokModel.

    The model is built on the meta device and each parameter is created from the checkpoint tensor
    by tensor, so memory never holds more than the model plus one tensor in flight. With
    `quantization="int8"` 8-bit matrices keep their stored int8 values and bf16 scales (float
    sources are quantised with the release's row blocks); without it they are dequantised
    (`weight · scale` per row block, exact in float32) and cast to `dtype`.
    """
    torch_dtype = parse_dtype(dtype)
    reader = open_checkpoint(path, config)
    model = GrokModel(reader.config, torch_dtype, device="meta", quantization=quantization)
    names = reader.names()
    show = (
        progress
        if progress is not None
        else reader.config.num_parameters() > PROGRESS_FROM_PARAMETERS
    )
    for name in tqdm(names, desc=f"loading {reader.path.name}", unit="tensor", disable=not show):
        owner, attribute = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        slot = getattr(module, attribute)
        setattr(module, attribute, materialise(name, reader.read(name), slot, device))
    for module in model.modules():  # non-persistent state: per-expert routing counts
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(module, buffer_name, torch.zeros_like(buffer, device=device))
    if left := [name for name, tensor in model.state_dict().items() if tensor.is_meta]:
        raise CheckpointError(f"{path}: no data for {left[:3]}")
    return model


def materialise(
    name: str, value: Tensor, slot: nn.Parameter | QuantizedWeight, device: str | torch.device
) -> nn.Parameter | QuantizedWeight:
    """The checkpoint tensor `value` in the form, dtype and device of the model's (meta) `slot`."""
    if tuple(value.shape) != tuple(slot.shape):
        raise CheckpointError(
            f"tensor {name}: the checkpoint holds shape {list(value.shape)} but the config "
            f"expects {list(slot.shape)}"
        )
    if isinstance(slot, QuantizedWeight):
        if not isinstance(value, QuantizedWeight):
            value = quantize(value.float(), slot.row_blocks)
        return QuantizedWeight(value.weight.to(device), value.scales.to(device))
    if isinstance(value, QuantizedWeight):
        return nn.Parameter(value.dequantize(slot.dtype, device), requires_grad=False)
    return nn.Parameter(value.to(device, slot.dtype), requires_grad=False)
