"""Build a replica's model shard and tokenizer from the serving config's `model` section."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from grokserve.model import GrokConfig, GrokModel, preset
from grokserve.model.checkpoint import open_checkpoint
from grokserve.model.checkpoint.base import CheckpointReader
from grokserve.model.config import SpecialTokens
from grokserve.model.parallel import GrokShard, shard_device, start_process_group
from grokserve.model.placement import Plan
from grokserve.model.sources import (
    Fetched,
    Progress,
    fetch,
    metadata_only,
    rank_experts,
    rank_slicer,
)
from grokserve.model.tokenizer import Tokenizer, beside_checkpoint
from grokserve.serving.config import ReplicaModel, ServingConfig
from grokserve.serving.engine import Engine
from grokserve.serving.scheduler import Executor, Scheduler, SchedulerObserver

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ByteTokenizer:
    """UTF-8 bytes as the 256 ids after the config's special tokens and Grok's [UNK] (4..259 for
    Grok's [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3), for models that ship without a SentencePiece file.

    With a 256-entry vocabulary (grok-tiny) the last bytes have no id; they never occur in valid
    UTF-8, so every text still round-trips.
    """

    def __init__(self, vocab_size: int, special: SpecialTokens) -> None:
        self.vocab_size = vocab_size
        self.first = max(special) + 2  # [UNK] follows the last special id in Grok's vocabulary

    def encode(self, text: str) -> list[int]:
        return [
            byte + self.first
            for byte in text.encode("utf-8")
            if byte + self.first < self.vocab_size
        ]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.first for i in ids if self.first <= i < self.first + 256)
        return data.decode("utf-8", errors="replace")


# Trained by scripts/train_demo.py; shipped as package data.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"


def open_source(spec: ReplicaModel) -> CheckpointReader:
    """A reader for `spec.source`'s config and headers in any format grokserve.model reads (its own
    config.json + safetensors, Hugging Face, or xAI's released checkpoint); a remote source
    fetches only its metadata into the node cache."""
    if spec.source is None:
        raise ValueError("the model spec has no source (it serves random preset weights)")
    return open_checkpoint(metadata_path(spec.source, spec.cache_dir))


@cache
def metadata_path(source: str, cache_dir: str | None) -> Path:
    """Config, index, tokenizer and safetensors headers, fetched once per process."""
    return fetch(source, cache_dir, slicer=metadata_only).path


def model_config(spec: ReplicaModel) -> GrokConfig:
    return preset(spec.preset) if spec.source is None else open_source(spec).config


def load_tokenizer(spec: ReplicaModel) -> Tokenizer | ByteTokenizer:
    config = model_config(spec)
    if spec.tokenizer is not None:
        return Tokenizer(fetch(spec.tokenizer, spec.cache_dir).path, config.special_tokens)
    if spec.source is not None and (
        shipped := beside_checkpoint(metadata_path(spec.source, spec.cache_dir))
    ):
        return Tokenizer(shipped, config.special_tokens)
    return ByteTokenizer(config.vocab_size, config.special_tokens)


def fetch_shard_weights(
    spec: ReplicaModel, plan: Plan, rank: int, on_progress: Progress | None = None
) -> Fetched:
    """The files and byte ranges of `spec.source` that `rank` holds in `plan`, in the node cache
    (a local source as it is)."""
    assert spec.source is not None
    slicer = rank_slicer(rank_experts(plan, rank))
    return fetch(spec.source, spec.cache_dir, slicer=slicer, on_progress=on_progress)


def placement_plan(config: ServingConfig) -> Plan:
    """Which rank holds which heads and experts in one replica, planned with the model the replica
    serves (its checkpoint's config, or its preset's)."""
    return config.plan(model_config(config.model))


def kv_cache_tokens(config: ServingConfig) -> int:
    """The replica's paged KV-cache capacity: `kvCacheTokens` when set; on CUDA, what the placement
    plan leaves on its fullest rank after weights, workspace and reserve; elsewhere
    maxBatchSize × maxSequenceLength."""
    if not config.cache_from_memory:
        return config.serving.kv_budget
    plan = placement_plan(config)
    planned = config.serving.max_sequence_length
    return min(
        (plan.cluster.gpu_memory - rank.total + rank.kv_cache) // (rank.kv_cache // planned)
        for rank in plan.ranks
    )


def load_shard(
    config: ServingConfig,
    rank: int,
    master: tuple[str, int],
    on_fetched: Callable[[Fetched], None] | None = None,
    on_progress: Progress | None = None,
) -> GrokShard:
    """This rank's shard of the replica's plan (the whole model when G = 1), its process group
    joined first when G > 1. Every rank of the replica calls this at the same time.

    From a checkpoint, each rank fetches and reads only its own slices (`on_progress` hears the
    bytes as they arrive, `on_fetched` what the fetch cost); with quantization int8 the checkpoint must hold 8-bit weights (as xAI's
    release does)."""
    plan = placement_plan(config)
    kind = config.resources.device
    device = shard_device(plan, rank, kind)
    if plan.world_size > 1:
        device = start_process_group(plan, rank, *master, kind=kind)
    spec = config.model
    if spec.source is not None:
        weights = fetch_shard_weights(spec, plan, rank, on_progress)
        if on_fetched is not None:
            on_fetched(weights)
        return GrokShard.from_source(open_checkpoint(weights.path), plan, rank, device)
    model = GrokModel.from_preset(spec.preset, seed=spec.seed, dtype=DTYPES[spec.dtype])
    if spec.quantization == "int8":
        model = model.quantized()
    return GrokShard.from_state_dict(model.state_dict(), plan, rank, device)


def describe_plan(plan: Plan) -> dict[str, Any]:
    """The plan as /v1/placement shows it: the table, and every rank's first-layer shard."""
    return {
        "parallelism": plan.parallelism.model_dump(),
        "cluster": plan.cluster.model_dump(),
        "table": plan.table(),
        "ranks": [
            {**memory.model_dump(), **plan.shard(0, memory.rank).model_dump(mode="json")}
            for memory in plan.ranks
        ],
    }


def build_engine(
    config: ServingConfig, executor: Executor, observer: SchedulerObserver | None = None
) -> Engine:
    """The request path over `executor` with the config's limits; its scheduler is not started."""
    tokenizer = load_tokenizer(config.model)
    special = model_config(config.model).special_tokens
    limits = config.serving
    scheduler = Scheduler(
        executor,
        tokenizer,
        max_batch_size=limits.max_batch_size,
        max_sequence_length=limits.max_sequence_length,
        max_queued_requests=limits.max_queued_requests,
        kv_budget=kv_cache_tokens(config),
        prefill_chunk_tokens=limits.prefill_chunk_tokens,
        eos_id=special.eos,
        pad_id=special.pad,
        observer=observer,
    )
    return Engine(
        scheduler, tokenizer, special, limits.default_max_tokens, limits.stream_interval_seconds
    )
