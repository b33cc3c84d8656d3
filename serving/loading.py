"""Build a replica's model shard and tokenizer from the serving config's `model` section."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from grokserve.model import GrokConfig, GrokModel, preset
from grokserve.model.checkpoint import open_checkpoint
from grokserve.model.checkpoint.base import CheckpointReader
from grokserve.model.parallel import GrokShard, shard_device, start_process_group
from grokserve.model.placement import GB, Cluster, Headroom, Parallelism, Plan, make_plan
from grokserve.model.tokenizer import Tokenizer, beside_checkpoint
from grokserve.serving.config import ModelSpec, ServingConfig
from grokserve.serving.engine import Engine
from grokserve.serving.scheduler import Executor, Scheduler, SchedulerObserver

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Ids below this are Grok's special tokens ([PAD], [BOS], [EOS], [UNK]).
_SPECIAL_IDS = 4


class ByteTokenizer:
    """UTF-8 bytes as ids 4..259, for models that ship without a SentencePiece file.

    With a 256-entry vocabulary (grok-tiny) bytes 0xFC..0xFF have no id; they never occur in
    valid UTF-8, so every text still round-trips.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [
            byte + _SPECIAL_IDS
            for byte in text.encode("utf-8")
            if byte + _SPECIAL_IDS < self.vocab_size
        ]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - _SPECIAL_IDS for i in ids if _SPECIAL_IDS <= i < _SPECIAL_IDS + 256)
        return data.decode("utf-8", errors="replace")


# Trained by scripts/train_demo.py; shipped as package data.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"


def open_source(spec: ModelSpec) -> CheckpointReader:
    """A reader for `spec.source` in any format grokserve.model reads (its own config.json +
    safetensors, Hugging Face, or xAI's released checkpoint)."""
    if spec.source is None:
        raise ValueError("the model spec has no source (it serves random preset weights)")
    return open_checkpoint(local_path(spec.source))


def model_config(spec: ModelSpec) -> GrokConfig:
    return preset(spec.preset) if spec.source is None else open_source(spec).config


def local_path(location: str) -> Path:
    """A checkpoint or tokenizer location as a local path (plain paths and file:// URLs)."""
    if location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise ValueError(
            f"{location}: the {scheme}:// scheme must be mounted or downloaded to a local path "
            "before the replica starts (the operator mounts pvc:// sources)"
        )
    return Path(location)


def load_tokenizer(spec: ModelSpec) -> Tokenizer | ByteTokenizer:
    if spec.tokenizer is not None:
        return Tokenizer(local_path(spec.tokenizer))
    if spec.source is not None and (shipped := beside_checkpoint(local_path(spec.source))):
        return Tokenizer(shipped)
    return ByteTokenizer(model_config(spec).vocab_size)


def placement_plan(config: ServingConfig) -> Plan:
    """Which rank holds which heads and experts in one replica (a pure function of the config)."""
    parallelism = config.parallelism
    degrees = None
    if parallelism.tensor is not None or parallelism.expert is not None:
        degrees = Parallelism(tensor=parallelism.tensor or 1, expert=parallelism.expert or 1)
    cluster = Cluster(
        nodes=parallelism.nodes_per_replica,
        gpus_per_node=parallelism.gpus_per_node,
        gpu_memory=int(config.resources.accelerator_memory_gb * GB),
    )
    limits = config.serving
    headroom = Headroom(
        # Sized from memory, the cache must hold at least one full-length sequence.
        cache_tokens=limits.max_sequence_length if cache_from_memory(config) else limits.kv_budget,
        step_tokens=limits.max_batch_size * limits.prefill_chunk_tokens,
    )
    quantization = "int8" if config.model.quantization == "int8" else None
    return make_plan(
        model_config(config.model), degrees, cluster, config.model.dtype, quantization, headroom
    )


def cache_from_memory(config: ServingConfig) -> bool:
    return config.serving.kv_cache_tokens is None and config.resources.device == "cuda"


def kv_cache_tokens(config: ServingConfig) -> int:
    """The replica's paged KV-cache capacity: `kvCacheTokens` when set; on CUDA, what the placement
    plan leaves on its fullest rank after weights, workspace and reserve; elsewhere
    maxBatchSize × maxSequenceLength."""
    if not cache_from_memory(config):
        return config.serving.kv_budget
    plan = placement_plan(config)
    planned = config.serving.max_sequence_length
    return min(
        (plan.cluster.gpu_memory - rank.total + rank.kv_cache) // (rank.kv_cache // planned)
        for rank in plan.ranks
    )


def load_shard(config: ServingConfig, rank: int, master: tuple[str, int]) -> GrokShard:
    """This rank's shard of the replica's plan (the whole model when G = 1), its process group
    joined first when G > 1. Every rank of the replica calls this at the same time.

    From a checkpoint, each rank reads only its own slices; with quantization int8 the checkpoint
    must hold 8-bit weights (as xAI's release does)."""
    plan = placement_plan(config)
    kind = config.resources.device
    device = shard_device(plan, rank, kind)
    if plan.world_size > 1:
        device = start_process_group(plan, rank, *master, kind=kind)
    spec = config.model
    if spec.source is not None:
        return GrokShard.from_source(open_source(spec), plan, rank, device)
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
    limits = config.serving
    scheduler = Scheduler(
        executor,
        tokenizer,
        max_batch_size=limits.max_batch_size,
        max_sequence_length=limits.max_sequence_length,
        max_queued_requests=limits.max_queued_requests,
        kv_budget=kv_cache_tokens(config),
        prefill_chunk_tokens=limits.prefill_chunk_tokens,
        eos_id=model_config(config.model).eos_token,
        observer=observer,
    )
    return Engine(scheduler, tokenizer, limits.default_max_tokens, limits.stream_interval_seconds)
