"""`grokserve plan`: print where every layer's heads and experts live on a cluster, without loading weights."""

from __future__ import annotations

import argparse
import sys

HELP = (
    "print the placement plan of a model on nodes × GPUs (table or --json); fails if it cannot fit"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="grok-1", help="model preset (default grok-1)")
    parser.add_argument("--config", help="a config.json instead of a preset")
    parser.add_argument(
        "--nodes", type=int, help="nodes per replica (default: the fewest that hold the model)"
    )
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument(
        "--gpu-memory",
        default="80Gi",
        help="memory per GPU with its unit: 80Gi (2^30 bytes per Gi) or 80G (10^9 bytes per G); "
        "default 80Gi",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="compute dtype",
    )
    parser.add_argument(
        "--quantization", choices=("int8", "none"), default="none", help="int8: keep 8-bit weights"
    )
    parser.add_argument("--tensor", type=int, help="attention ranks per group (divides kv heads)")
    parser.add_argument(
        "--expert", type=int, help="groups of whole experts (divides experts and GPUs)"
    )
    parser.add_argument(
        "--cache-tokens", type=int, default=65536, help="KV-cache tokens to reserve room for"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from grokserve.model.config import ConfigError, GrokConfig
    from grokserve.model.placement import (
        Cluster,
        Headroom,
        MemorySizeError,
        Parallelism,
        PlacementError,
        default_parallelism,
        make_plan,
        minimum_nodes,
        parse_memory,
    )
    from grokserve.model.presets import preset

    try:
        config = GrokConfig.from_json(args.config) if args.config else preset(args.preset)
        if (args.nodes is not None and args.nodes < 1) or args.gpus_per_node < 1:
            raise PlacementError("--nodes and --gpus-per-node must be at least 1")
        quantization = None if args.quantization == "none" else args.quantization
        if args.cache_tokens < 0:
            raise PlacementError("--cache-tokens cannot be negative")
        headroom = Headroom(cache_tokens=args.cache_tokens)
        cluster = Cluster(
            nodes=args.nodes or 1,
            gpus_per_node=args.gpus_per_node,
            gpu_memory=parse_memory(args.gpu_memory, "--gpu-memory"),
        )
        if args.nodes is None:
            # Unasked, the plan is for the fewest nodes that hold the model; when none do,
            # make_plan's refusal on one node says why.
            fewest = minimum_nodes(config, cluster, args.dtype, quantization, headroom)
            cluster = cluster.model_copy(update={"nodes": fewest or 1})
        parallelism = None
        if args.tensor is not None or args.expert is not None:
            default = default_parallelism(config, cluster)
            tensor = args.tensor if args.tensor is not None else default.tensor
            expert = args.expert if args.expert is not None else default.expert
            if tensor < 1 or expert < 1:
                raise PlacementError("--tensor and --expert must be at least 1")
            parallelism = Parallelism(tensor=tensor, expert=expert)
        plan = make_plan(config, parallelism, cluster, args.dtype, quantization, headroom)
    except (PlacementError, MemorySizeError, ConfigError, OSError) as error:
        print(f"grokserve plan: {error}", file=sys.stderr)
        return 1
    print(plan.to_json() if args.json else plan.table())
    return 0
