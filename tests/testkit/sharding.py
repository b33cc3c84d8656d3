"""Multi-process checks of sharded execution: each spawned rank compares its shard with the whole model.

Workers live here (an importable module) because spawned processes re-import the function by name.
One spawn per world size runs every case; each rank writes its measurements to `<out>/rank<r>.json`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grokserve.model import GrokModel
from grokserve.model.parallel import (
    GrokShard,
    StateDictSource,
    shard_tensors,
    start_process_group,
)
from grokserve.model.placement import Cluster, Parallelism, Plan, make_plan
from grokserve.model.quantization import QuantizedWeight


def shard_state_dict(
    state_dict: Mapping[str, torch.Tensor], plan: Plan, rank: int
) -> dict[str, torch.Tensor]:
    """This rank's part of a full GrokModel state dict, under the same names (int8 stays int8)."""
    local: dict[str, torch.Tensor] = {}
    for name, value in shard_tensors(StateDictSource(state_dict), plan, rank):
        if isinstance(value, QuantizedWeight):
            local[f"{name}.weight"], local[f"{name}.scales"] = value.weight, value.scales
        else:
            local[name] = value
    return local


PRESET = "grok-tiny"
PREFILL, DECODE_STEPS = 6, 4

# name -> (nodes, gpus per node, tensor, expert, weights); world size = nodes × GPUs per node.
# Weights: "float32", "int8" (float32 activations) or "bfloat16".
CASES: dict[int, dict[str, tuple[int, int, int, int, str]]] = {
    2: {
        "tensor_only": (1, 2, 2, 1, "float32"),
        "expert_only": (1, 2, 1, 2, "float32"),
        "tensor_only_int8": (1, 2, 2, 1, "int8"),
    },
    4: {
        "tensor_x_expert": (1, 4, 2, 2, "float32"),
        "f_sliced_experts": (1, 4, 1, 1, "float32"),
        "whole_experts_tensor_4": (1, 4, 4, 4, "float32"),
        "two_nodes": (2, 2, 2, 2, "float32"),
        "two_nodes_int8": (2, 2, 2, 2, "int8"),
        "tensor_x_expert_bf16": (1, 4, 2, 2, "bfloat16"),
    },
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_world(world: int, out: Path, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Spawns `world` ranks on 127.0.0.1 (gloo) and returns each rank's measurements."""
    port = free_port()
    context = mp.start_processes(
        worker, args=(world, port, str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def tokens() -> torch.Tensor:
    batch = torch.randint(
        3, 256, (2, PREFILL + DECODE_STEPS), generator=torch.Generator().manual_seed(7)
    )
    batch[1, :2] = 0  # a left-padded row: pad keys must stay masked on every shard
    return batch


def run_model(model: GrokModel) -> dict[str, torch.Tensor]:
    """Full forward, then prefill + decode steps on a cache, and the routed-token counts."""
    batch = tokens()
    full = model(batch)
    cache = model.new_cache(batch_size=2, max_len=16)
    steps = [model(batch[:, :PREFILL], cache=cache)]
    steps += [
        model(batch[:, i : i + 1], cache=cache) for i in range(PREFILL, PREFILL + DECODE_STEPS)
    ]
    return {
        "full": full.cpu(),
        "decode": torch.cat(steps, dim=1).cpu(),
        "counts": model.expert_token_counts(),
        "cache_heads": torch.tensor(cache.keys[0].shape[2]),
    }


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    config = GrokModel.from_preset(PRESET).config
    plans = {
        name: make_plan(
            config,
            Parallelism(tensor=tensor, expert=expert),
            Cluster(nodes=nodes, gpus_per_node=gpus, gpu_memory=10**9),
            "bfloat16" if weights == "bfloat16" else "float32",
            "int8" if weights == "int8" else None,
        )
        for name, (nodes, gpus, tensor, expert, weights) in CASES[world].items()
    }
    start_process_group(next(iter(plans.values())), rank, "127.0.0.1", port, timeout=60)
    try:
        float_model = GrokModel.from_preset(PRESET, seed=0)
        models = {
            "float32": float_model,
            "int8": float_model.quantized(),
            "bfloat16": float_model.astype(torch.bfloat16),
        }
        weights_of = {name: case[4] for name, case in CASES[world].items()}
        references = {kind: run_model(models[kind]) for kind in {"float32", *weights_of.values()}}
        results: dict[str, Any] = {}
        for name, plan in plans.items():
            state = models[weights_of[name]].state_dict()
            shard = GrokShard.from_state_dict(state, plan, rank)
            expected, got = references[weights_of[name]], run_model(shard)
            local, held = shard_state_dict(state, plan, rank), shard.state_dict()
            results[name] = {
                "full": float((got["full"] - expected["full"]).abs().max()),
                # bf16 is judged by its distance from float32, next to the single-process model's.
                "full_error": float((got["full"] - references["float32"]["full"]).abs().max()),
                "single_full_error": float(
                    (expected["full"] - references["float32"]["full"]).abs().max()
                ),
                "decode": float((got["decode"] - expected["decode"]).abs().max()),
                "counts_equal": bool(torch.equal(got["counts"], expected["counts"])),
                "cache_heads": int(got["cache_heads"]),
                "state_dict_matches": sorted(local) == sorted(held)
                and all(torch.equal(local[key], value) for key, value in held.items()),
                "experts": [p.expert for p in plan.shard(0, rank).experts],
            }
            dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
