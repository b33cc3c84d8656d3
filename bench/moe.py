"""One full-width Grok-1 MoE layer on an NVIDIA GPU: our fused kernels against the roofline and two
PyTorch baselines (issue 4).

    python bench/moe.py [--tokens 1 8 64 ...] [--sweep] [--json results.json]

For each token count: roofline = max(bytes of the experts hit / copy bandwidth, FLOPs / matmul peak),
both ceilings measured in this run; int8 rows use the int8 bytes. Routing (router matmul, softmax,
top-2) is inside every timed call. Calls of up to --graph-max tokens are timed as CUDA-graph replays
where the path allows it (the per-expert loop synchronises with the host, so it runs eagerly).
Fractions are roofline / measured (1.00 = at the hardware limit).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from grokserve.model import layers
from grokserve.model.kernels.benchmarking import (
    Ceilings,
    graph_of,
    measure_ceilings,
    median_ms,
    require_cuda,
)
from grokserve.model.quantization import QuantizedWeight, quantize

TOKEN_COUNTS = (1, 8, 64, 256, 1024, 4096, 16384)


@dataclass
class Row:
    tokens: int
    roofline_ms: float
    int8_roofline_ms: float
    timings_ms: dict[str, float | str]


def grouped_mm_moe(x, gates, experts, w_gate, w_up, w_down):
    """Baseline: tokens sorted by expert, three torch._grouped_mm calls, gate and scatter in PyTorch."""
    num_experts = w_gate.shape[0]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0).to(torch.int32)
    tokens = order // experts.shape[1]
    xs = x[tokens]
    h = layers.gelu_tanh(torch._grouped_mm(xs, w_gate, offs=ends)) * torch._grouped_mm(
        xs, w_up, offs=ends
    )
    y = torch._grouped_mm(h, w_down, offs=ends) * gates.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def random_layer(device: torch.device, model: int, ffn: int, num_experts: int):
    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (
            torch.randn(num_experts, rows, cols, dtype=torch.bfloat16, device=device) * rows**-0.5
        )

    router = torch.randn(model, num_experts, device=device)
    return router, matrix(model, ffn), matrix(model, ffn), matrix(ffn, model)


def quantize_on_device(weight: torch.Tensor, blocks: int) -> QuantizedWeight:
    # One expert at a time: the float32 intermediate of a whole stack would not fit beside the rest.
    parts = [quantize(expert.float(), blocks) for expert in weight]
    return QuantizedWeight(
        torch.stack([p.weight for p in parts]), torch.stack([p.scales for p in parts])
    )


def time_path(fn: Callable[[], object], use_graph: bool) -> float | str:
    try:
        return median_ms(graph_of(fn) if use_graph else fn)
    except Exception as error:  # a baseline that cannot run here is reported, not fatal
        return f"failed: {type(error).__name__}: {str(error)[:60]}"


def run_token_count(args, ceilings: Ceilings, weights, quantized, tokens: int) -> Row:
    from grokserve.model.kernels.moe_triton import fused_moe

    router, w_gate, w_up, w_down = weights
    model, ffn = w_gate.shape[1], w_gate.shape[2]
    x = torch.randn(tokens, model, dtype=torch.bfloat16, device=router.device)
    gates, experts = layers.route(x, router, args.top_k)
    hit = int(torch.unique(experts).numel())
    flops = 2 * tokens * args.top_k * 3 * model * ffn
    activations = 2 * tokens * model * 2
    bf16_bytes = hit * 3 * model * ffn * 2 + activations
    int8_bytes = hit * 3 * model * ffn + activations

    def routed(moe: Callable, *matrices) -> Callable[[], object]:
        def call():
            g, e = layers.route(x, router, args.top_k)
            return moe(x, g, e, *matrices)

        return call

    small = tokens <= args.graph_max
    # (call, CUDA-graph capturable): both baselines synchronise with the host (nonzero, bincount).
    paths = {
        "fused bf16": (routed(fused_moe, w_gate, w_up, w_down), small),
        "fused int8": (routed(fused_moe, *quantized), small),
        "per-expert loop": (routed(layers.moe, w_gate, w_up, w_down), False),
        "grouped_mm": (routed(grouped_mm_moe, w_gate, w_up, w_down), False),
    }
    dequantized = [w.dequantize(torch.bfloat16) for w in quantized]
    errors = {
        "bf16": relative_error(
            fused_moe(x, gates, experts, w_gate, w_up, w_down),
            layers.moe(x, gates, experts, w_gate, w_up, w_down),
        ),
        # The int8 kernel must equal the bf16 reference on the dequantised weights.
        "int8": relative_error(
            fused_moe(x, gates, experts, *quantized),
            layers.moe(x, gates, experts, *dequantized),
        ),
    }
    del dequantized
    print(f"# {tokens} tokens: relative error vs reference {errors}", flush=True)
    if not max(errors.values()) < 1e-2:
        sys.exit(f"the fused MoE differs from the reference at {tokens} tokens: {errors}")
    timings = {name: time_path(fn, graph) for name, (fn, graph) in paths.items()}
    return Row(
        tokens,
        ceilings.roofline_ms(bf16_bytes, flops),
        ceilings.roofline_ms(int8_bytes, flops),
        timings,
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def fraction(roofline: float, measured: float | str) -> str:
    return f"{roofline / measured:.2f}" if isinstance(measured, float) else "-"


def print_table(rows: list[Row]) -> None:
    names = list(rows[0].timings_ms)
    header = ["tokens", "roofline ms", *[f"{n} ms (frac)" for n in names], "int8/bf16 speed-up"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        cells = [str(row.tokens), f"{row.roofline_ms:.3f}"]
        for name in names:
            measured = row.timings_ms[name]
            roof = row.int8_roofline_ms if "int8" in name else row.roofline_ms
            cells.append(
                f"{measured:.3f} ({fraction(roof, measured)})"
                if isinstance(measured, float)
                else measured
            )
        bf16, int8 = row.timings_ms["fused bf16"], row.timings_ms["fused int8"]
        both = isinstance(bf16, float) and isinstance(int8, float)
        cells.append(f"{bf16 / int8:.2f}x" if both else "-")
        print("| " + " | ".join(cells) + " |")


def sweep(args, weights, quantized) -> None:
    """Times candidate tile configurations per token count and prints the best (to fill tuning.py)."""
    from grokserve.model.kernels.moe_triton import fused_moe
    from grokserve.model.kernels.tuning import MoeTileConfig

    router, w_gate, w_up, w_down = weights
    for tokens in args.tokens:
        # Decode sizes fill one 16-row block per expert; larger ones want tensor-core-sized blocks.
        row_blocks = (16,) if tokens <= 64 else (64, 128)
        candidates = [
            MoeTileConfig(
                bm, bn, bk, warps, stages, bn, bk, warps, stages, group_m=1 if bm == 16 else 8
            )
            for bm in row_blocks
            for bn in (32, 64, 128)
            for bk in (64, 128, 256)
            for warps in (4, 8)
            for stages in (3, 4)
            if not (bm == 128 and bk == 256)
        ]
        x = torch.randn(tokens, w_gate.shape[1], dtype=torch.bfloat16, device=router.device)
        gates, experts = layers.route(x, router, args.top_k)
        for label, matrices in (("bf16", (w_gate, w_up, w_down)), ("int8", quantized)):
            results = []
            for config in candidates:
                call = functools.partial(fused_moe, x, gates, experts, *matrices, None, config)
                measured = time_path(call, tokens <= args.graph_max)
                if isinstance(measured, float):
                    results.append((measured, config))
            best_ms, best = min(results, key=lambda r: r[0])
            print(f"sweep {label} tokens={tokens}: {best_ms:.3f} ms with {best}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_COUNTS))
    parser.add_argument("--model", type=int, default=6144, help="D")
    parser.add_argument("--ffn", type=int, default=32768, help="F")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--graph-max", type=int, default=256, help="CUDA graphs up to this many tokens"
    )
    parser.add_argument("--sweep", action="store_true", help="search tile configs instead")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    require_cuda("bench/moe.py")
    if any(t < 1 for t in args.tokens):
        parser.error("--tokens must be positive")
    device = torch.device("cuda")
    torch.manual_seed(0)
    ceilings = measure_ceilings(device)
    print(f"# {torch.cuda.get_device_name(device)}: {ceilings.describe()}", flush=True)
    weights = random_layer(device, args.model, args.ffn, args.experts)
    quantized = (
        quantize_on_device(weights[1], 1),
        quantize_on_device(weights[2], 1),
        quantize_on_device(weights[3], 8),
    )
    if args.sweep:
        sweep(args, weights, quantized)
        return 0
    rows = []
    for tokens in args.tokens:
        rows.append(run_token_count(args, ceilings, weights, quantized, tokens))
        print(f"# {tokens} tokens done: {rows[-1].timings_ms}", flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"ceilings": asdict(ceilings), "rows": [asdict(r) for r in rows]}, out, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
