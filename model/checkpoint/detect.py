"""Which format a path holds, and the config that goes with it."""

from __future__ import annotations

import json
from pathlib import Path

from grokserve.model.checkpoint.base import CheckpointError, CheckpointReader
from grokserve.model.checkpoint.huggingface import HuggingFaceReader
from grokserve.model.checkpoint.native import NativeReader
from grokserve.model.checkpoint.released import ReleasedReader, is_released_dir
from grokserve.model.checkpoint.safetensors_io import INDEX_FILE
from grokserve.model.config import ConfigError, GrokConfig
from grokserve.model.presets import PRESETS, preset

EXPECTED = (
    "expected one of: a directory holding ckpt-0/tensor00000_000... (the xAI release, with "
    "config.json beside ckpt-0/), a ckpt-0 directory itself, or a directory holding config.json "
    f"and model.safetensors or {INDEX_FILE} (a Hugging Face port, or grokserve's own format)"
)


def open_checkpoint(
    path: str | Path, config: GrokConfig | str | Path | None = None
) -> CheckpointReader:
    """A reader for the checkpoint at `path`. `config` (a GrokConfig, preset name or JSON path)
    overrides the checkpoint's own config.json; the release without one is taken to be `grok-1`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {EXPECTED}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory; {EXPECTED}")
    override = resolve_config(config)
    for released in (path / "ckpt-0", path):
        if is_released_dir(released):
            beside = released.parent / "config.json"
            if override is None and beside.is_file():
                override = read_config(beside)
            return ReleasedReader(released, override or preset("grok-1"))
    config_file = path / "config.json"
    has_tensors = (path / "model.safetensors").is_file() or (path / INDEX_FILE).is_file()
    if not (config_file.is_file() and has_tensors):
        raise CheckpointError(f"{path} is not a checkpoint; {EXPECTED}")
    if is_hf_config(config_file):
        return HuggingFaceReader(path, override or read_config(config_file))
    return NativeReader(path, override or read_config(config_file))


def resolve_config(config: GrokConfig | str | Path | None) -> GrokConfig | None:
    if config is None or isinstance(config, GrokConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return preset(config)
    if not Path(config).is_file():
        raise CheckpointError(
            f"config {config!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    return read_config(Path(config))


def read_config(path: Path) -> GrokConfig:
    try:
        return GrokConfig.from_json(path)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from error


def is_hf_config(path: Path) -> bool:
    try:
        return "hidden_size" in json.loads(path.read_text())
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
