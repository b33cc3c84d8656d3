"""Where each part of one model instance lives: a pure, serialisable placement plan (no torch, no weights).

Modules: `units` (memory sizes), `plan` (the types), `layout` (who holds what), `memory` (bytes per
rank), `checks` (a plan's invariants), `render` (table and summary), `fit` (the planner: `make_plan`).

A replica of G = nodes × GPUs-per-node ranks executes SPMD: every rank holds the same token activations.

- **Attention** is split over `tensor` ranks by kv head, each with its query heads (query head h reads kv
  head h // (Hq / Hkv)), so `tensor` divides `num_kv_heads`. Ranks `r` with the same `r // tensor` form
  one attention group; when G > tensor the G / tensor groups compute the same attention redundantly.
  Groups are runs of consecutive ranks, so they stay inside a node when `tensor` divides GPUs per node.
- **Experts** are split over `expert` groups of whole experts (expert parallelism), and each expert is
  sliced along its hidden size F over the G / `expert` ranks of its group (the reference's own sharding).
  Groups are runs of consecutive ranks too: with `expert` = number of nodes (the default) every expert
  lives inside one node, so a token's expert work never crosses nodes; the MoE outputs of all G ranks are
  summed (all-reduce).
- A shard may hold a **replicated** expert slice (`replicas` > 1, for hot experts); the holders then
  split that slice's tokens. The default planner does not replicate.

Memory per rank = weights + KV cache + workspace + reserve (`Headroom`, the fit rule):
- KV cache: `cache_tokens` tokens of the rank's kv heads in every layer (k and v, compute dtype);
- workspace: the logits of one step of `step_tokens` tokens (compute dtype and float32 copies), plus, with
  int8 weights, one layer's local matrices dequantised to the compute dtype;
- reserve: `reserve_fraction` of the GPU for the CUDA context, communication buffers and fragmentation.
A plan fits when every rank's total is at most the GPU memory.
"""

from grokserve.model.placement.fit import DoesNotFitError, make_plan, minimum_nodes
from grokserve.model.placement.layout import default_parallelism, layout
from grokserve.model.placement.plan import (
    DTYPE_BYTES,
    Cluster,
    DType,
    ExpertSlice,
    Headroom,
    Parallelism,
    PlacementError,
    Plan,
    Quantization,
    RankMemory,
    Shard,
)
from grokserve.model.placement.units import GB, MemorySizeError, gigabytes, parse_memory

__all__ = [
    "DTYPE_BYTES",
    "GB",
    "Cluster",
    "DType",
    "DoesNotFitError",
    "ExpertSlice",
    "Headroom",
    "MemorySizeError",
    "Parallelism",
    "PlacementError",
    "Plan",
    "Quantization",
    "RankMemory",
    "Shard",
    "default_parallelism",
    "gigabytes",
    "layout",
    "make_plan",
    "minimum_nodes",
    "parse_memory",
]
