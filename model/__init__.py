"""Grok-1 in PyTorch: configuration, modules, KV cache, sampling, tokenizer and checkpoint loaders.

The package imports lazily: `grokserve.model.config`, `.presets` and `.placement` need no torch, so
the operator (whose image has none) plans replicas with them. The names below load their module
(and torch, for the modules that need it) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grokserve.model.cache import CacheFullError, KVCache
    from grokserve.model.config import ConfigError, GrokConfig
    from grokserve.model.loading import load_model
    from grokserve.model.presets import PRESETS, preset
    from grokserve.model.transformer import GrokModel

_EXPORTS = {
    "PRESETS": "presets",
    "CacheFullError": "cache",
    "ConfigError": "config",
    "GrokConfig": "config",
    "GrokModel": "transformer",
    "KVCache": "cache",
    "load_model": "loading",
    "preset": "presets",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
