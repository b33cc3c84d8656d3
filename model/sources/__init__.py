"""Checkpoint and tokenizer locations: local paths, or s3://, gs:// and hf:// through a node-local
cache (no module here imports torch).

```python
fetched = fetch("s3://bucket/grok-1", cache_dir="~/.cache/grokserve")  # every file, verified
fetched = fetch(url, cache_dir, slicer=checkpoint_files)                # what readers read
fetched = fetch(url, cache_dir, slicer=metadata_only)                   # config, headers, tokenizer
fetched = fetch(url, cache_dir, slicer=rank_slicer(experts))            # one rank's share
open_checkpoint(fetched.path)
```
"""

from __future__ import annotations

from pathlib import Path

from grokserve.model.sources.cache import DEFAULT_CACHE_DIR, Fetched, NodeCache, Progress, Slicer
from grokserve.model.sources.errors import SourceError, StoreUnreachable
from grokserve.model.sources.location import Location, parse_location
from grokserve.model.sources.slices import (
    checkpoint_files,
    metadata_only,
    rank_experts,
    rank_slicer,
)
from grokserve.model.sources.store import open_store

__all__ = [
    "DEFAULT_CACHE_DIR",
    "Fetched",
    "Location",
    "Progress",
    "SourceError",
    "StoreUnreachable",
    "checkpoint_files",
    "fetch",
    "metadata_only",
    "parse_location",
    "rank_experts",
    "rank_slicer",
]


def fetch(
    url: str | Path,
    cache_dir: str | Path | None = None,
    slicer: Slicer | None = None,
    progress: bool = False,
    on_progress: Progress | None = None,
) -> Fetched:
    """A local path holding `url` (or the part of it `slicer` wants); local locations as they are.

    `progress` draws a tqdm bar of the bytes fetched; `on_progress` hears (bytes of the share on
    disk, bytes of the share) as they arrive (never for a local location: nothing is fetched)."""
    location = parse_location(str(url))
    if location.path is not None:
        return Fetched(location.path, 0, 0, 0, 0.0)
    cache = NodeCache(Path(cache_dir or DEFAULT_CACHE_DIR), location)
    return cache.fetch(open_store(location), slicer, progress, on_progress)
