"""Grok-1 in PyTorch: configuration, modules, KV cache, sampling, tokenizer and checkpoint loaders."""

from grokserve.model.cache import CacheFullError, KVCache
from grokserve.model.config import ConfigError, GrokConfig
from grokserve.model.loading import load_model
from grokserve.model.presets import PRESETS, preset
from grokserve.model.transformer import GrokModel

__all__ = [
    "PRESETS",
    "CacheFullError",
    "ConfigError",
    "GrokConfig",
    "GrokModel",
    "KVCache",
    "load_model",
    "preset",
]
