"""Cold start of a small model's weights: local disk vs S3 on loopback vs a warm node cache, and
the bytes each rank of a 4-rank expert-parallel plan fetches against the checkpoint's size.

    python bench/load.py [--emb 512] [--layers 8] [--experts 8]

One run, one random bf16 model in grokserve's format (config.json + model.safetensors):
  1. local disk: `load_shard` from the directory (just written, so the page cache is warm:
     this is the floor the other two approach);
  2. S3 cold: moto's S3 server on 127.0.0.1, an empty --cache-dir: list, fetch, verify, load;
  3. warm cache: the same URL and cache again (a listing, no bytes fetched), then load;
  4. rank-sliced: a 4-rank expert-parallel plan (4 nodes × 1 GPU, expert=4), each rank fetching
     into its own empty cache: bytes fetched per rank and its share of the checkpoint.
Prints seconds and MB/s of each and the ratios S3 cold / local and warm / local.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from grokserve.model import GrokModel, preset
from grokserve.model.checkpoint import open_checkpoint, save_pretrained
from grokserve.model.parallel import shard_tensors
from grokserve.model.placement import Cluster, Parallelism, make_plan
from grokserve.model.sources import fetch, rank_experts, rank_slicer
from grokserve.serving.config import ServingConfig
from grokserve.serving.loading import load_shard

# moto's server harness lives with the tests (tests/testkit); the benchmark reuses it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from testkit.stores import moto_s3, upload_s3

MB = 1e6


def write_model(directory: Path, emb: int, layers: int, experts: int) -> Path:
    config = dataclasses.replace(
        preset("grok-mini"), emb_size=emb, num_layers=layers, num_experts=experts
    )
    model = GrokModel(config, dtype=torch.bfloat16).init_random_(0)
    return save_pretrained(model, directory)


def timed_load(source: str, cache: Path | None = None) -> float:
    spec = {"source": source, "dtype": "bfloat16"} | ({"cache_dir": str(cache)} if cache else {})
    config = ServingConfig(model=spec)
    started = time.perf_counter()
    load_shard(config, rank=0, master=("127.0.0.1", 0))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emb", type=int, default=512, help="model width")
    parser.add_argument("--layers", type=int, default=8, help="transformer layers")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-load-"))
    directory = write_model(root / "model", args.emb, args.layers, args.experts)
    size = sum(p.stat().st_size for p in directory.iterdir())
    config = open_checkpoint(directory).config
    print(f"model: {config.num_parameters() / 1e6:.1f}M parameters, {size / MB:.1f} MB (bf16)")

    timed_load(str(directory))  # first-call costs (imports, allocator) out of the comparison
    local = timed_load(str(directory))
    with moto_s3():
        upload_s3(directory, "bench", "model")
        url = "s3://bench/model"
        cold = timed_load(url, root / "cache")
        warm = timed_load(url, root / "cache")
        plan = make_plan(
            config,
            Parallelism(tensor=1, expert=4),
            Cluster(nodes=4, gpus_per_node=1, gpu_memory=10**10),
            "bfloat16",
            None,
        )
        ranks = []
        for rank in range(4):
            fetched = fetch(url, root / f"node{rank}", rank_slicer(rank_experts(plan, rank)))
            for _ in shard_tensors(open_checkpoint(fetched.path), plan, rank):
                pass  # each of its slices reads from what it fetched
            ranks.append(fetched.fetched_bytes)

    print(f"{'source':<22} {'seconds':>8} {'MB/s':>8}")
    for name, seconds in (("local disk", local), ("S3 loopback, cold", cold), ("warm cache", warm)):
        print(f"{name:<22} {seconds:>8.2f} {size / MB / seconds:>8.0f}")
    print(f"S3 cold / local: {cold / local:.2f}×   warm cache / local: {warm / local:.2f}×")
    print(f"4-rank expert-parallel plan, checkpoint {size:,} bytes:")
    for rank, fetched_bytes in enumerate(ranks):
        planned = plan.ranks[rank].weights
        print(
            f"  rank {rank}: fetched {fetched_bytes:>12,} bytes = {fetched_bytes / size:6.1%} of "
            f"the checkpoint; the plan puts {planned:,} bytes ({planned / size:6.1%}) on it"
        )


if __name__ == "__main__":
    main()
