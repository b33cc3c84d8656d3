"""Grok-1 MoE layers on an NVIDIA GPU: our fused kernels against the roofline and two PyTorch
baselines (issues 4 and 17), and the tile sweep that fills `tuning.py`.

    python bench/moe.py [--tokens 1 8 64 ...] [--shapes 8x32768 8x4096 1x32768] [--json rows.json]
    python bench/moe.py --sweep --sweep-json tiles.json [--sweep-budget-s 150]
    python bench/moe.py --precompile [--shapes …] [--tokens …]   # only the sweep's compiles
    python bench/moe.py --dry-run ...   # CPU, tiny sizes, Triton's interpreter: plumbing only

A shape `ExF` is one GPU's expert stack: E experts of hidden size F (8x32768: the full layer on one
GPU; 8x4096: the default deployment's tensor-parallel slice; 1x32768: one expert per GPU). The router
always chooses among --experts (8); pairs routed to experts the GPU does not hold get no work, so
the output is that GPU's partial sum.

For each token count: roofline = max(bytes of the held experts hit / copy bandwidth, FLOPs of the held
pairs / matmul peak), both ceilings measured in this run; int8 rows use the int8 bytes. Routing
(router matmul, softmax, top-2) is inside every timed call. Calls of up to --graph-max tokens are timed
as CUDA-graph replays where the path allows it (the baselines synchronise with the host, so they run
eagerly). Fractions are roofline / measured (1.00 = at the hardware limit). The full-width rows
print the anchors of `perf-anchors.md` (H100) beside ours.

The `dispatched` columns time what the model runs (`kernels.moe`): the fused kernel below the
crossover of `kernels/crossover.py`, the per-expert loop from it on (set GROKSERVE_MOE_LOOP_FROM to
move it); the cell names the path taken. Every fused and dispatched result is checked against the
reference; one further than MAX_RELATIVE_ERROR is printed WRONG and fails the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from grokserve.model import kernels, layers
from grokserve.model.kernels.benchmarking import (
    Ceilings,
    graph_of,
    measure_ceilings,
    median_ms,
    require_cuda,
)
from grokserve.model.kernels.tuning import MoeTileConfig, TileKey, pick_config, table_entry
from grokserve.model.quantization import QuantizedWeight, quantize

TOKEN_COUNTS = (1, 8, 64, 256, 1024, 4096, 16384)
FULL_WIDTH = "8x32768"
# perf-anchors.md (one H100, full-width layer): per-expert loop, torch._grouped_mm, the best public
# Triton fused MoE in bf16 and int8 weight-only, as fractions of the roofline.
ANCHORS = {
    1: ("0.44–0.54", "0.58–0.63", "0.84", "0.60"),
    8: ("0.66–0.74", "0.75–0.79", "0.99", "0.95"),
    64: ("0.66–0.70", "0.77–0.81", "0.97", "0.84"),
    256: ("0.64–0.68", "0.77", "0.81", "0.41"),
    1024: ("0.56–0.58", "0.49–0.50", "0.50–0.51", "0.38–0.39"),
    4096: ("0.72", "0.69–0.72", "0.72", "0.48"),
    16384: ("0.76–0.78", "0.76–0.78", "0.72", "0.48"),
}
# A fused result further than this from the reference (relative L2) fails the run.
MAX_RELATIVE_ERROR = 1e-2
DTYPES = ("bf16", "int8")
DRY_RUN = {"model": 32, "shapes": ["4x128", "1x128"], "tokens": [1, 8]}


@dataclass(frozen=True)
class Shape:
    held: int  # experts in this GPU's stack (global ids 0 … held-1)
    ffn: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        try:
            held, ffn = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a shape is EXPERTSxF, e.g. 8x4096; got {text!r}"
            ) from None
        if held < 1 or ffn < 16 or ffn % 16:
            raise argparse.ArgumentTypeError(f"{text!r}: need ≥ 1 expert and F a multiple of 16")
        return cls(held, ffn)

    def __str__(self) -> str:
        return f"{self.held}x{self.ffn}"


@dataclass
class Row:
    shape: str
    tokens: int
    roofline_ms: float
    int8_roofline_ms: float
    timings_ms: dict[str, float | str]
    errors: dict[str, dict[str, float]]  # by checked path: fused/dispatched bf16/int8
    dispatched: dict[str, str]  # by weight dtype: the path kernels.moe took (kernels.MOE_PATHS)


class Layer:
    """One GPU's random expert stack (bf16 and its int8 copy) and the router over all experts."""

    def __init__(self, args, device: torch.device, shape: Shape) -> None:
        def matrix(rows: int, cols: int) -> torch.Tensor:
            draw = torch.randn(shape.held, rows, cols, dtype=torch.bfloat16, device=device)
            return draw * rows**-0.5

        self.shape = shape
        self.top_k = args.top_k
        self.expert_ids = list(range(shape.held))
        self.router = torch.randn(args.model, args.experts, device=device)
        self.bf16 = (matrix(args.model, shape.ffn), matrix(args.model, shape.ffn))
        self.bf16 = (*self.bf16, matrix(shape.ffn, args.model))
        # As released: one scale row for gate/up, 8 row blocks along F for down.
        self.int8 = tuple(
            quantize_on_device(w, blocks) for w, blocks in zip(self.bf16, (1, 1, 8), strict=True)
        )

    def weights(self, dtype: str) -> tuple:
        return self.int8 if dtype == "int8" else self.bf16

    def tile_key(self, dtype: str, tokens: int) -> TileKey:
        return TileKey(self.shape.held, self.shape.ffn, dtype, tokens)


def grouped_mm_moe(x, gates, experts, w_gate, w_up, w_down, expert_ids):
    """Baseline: pairs sorted by held expert, three torch._grouped_mm calls, gate and scatter in
    PyTorch; pairs of experts not held sort last, past every group, and are dropped."""
    held = len(expert_ids)
    flat = experts.reshape(-1)
    local = torch.where(flat < held, flat, held)  # held experts are the global ids 0 … held-1
    order = torch.argsort(local, stable=True)
    ends = torch.cumsum(torch.bincount(local, minlength=held + 1)[:held], 0).to(torch.int32)
    tokens = order // experts.shape[1]
    xs = x[tokens]
    h = layers.gelu_tanh(torch._grouped_mm(xs, w_gate, offs=ends)) * torch._grouped_mm(
        xs, w_up, offs=ends
    )
    y = torch._grouped_mm(h, w_down, offs=ends) * gates.reshape(-1)[order, None].to(x.dtype)
    y = torch.where((local[order] < held)[:, None], y, 0)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def quantize_on_device(weight: torch.Tensor, blocks: int) -> QuantizedWeight:
    # One expert at a time: the float32 intermediate of a whole stack would not fit beside the rest.
    parts = [quantize(expert.float(), blocks) for expert in weight]
    return QuantizedWeight(
        torch.stack([p.weight for p in parts]), torch.stack([p.scales for p in parts])
    )


def time_path(fn: Callable[[], object], use_graph: bool, **timing: int) -> float | str:
    try:
        return median_ms(graph_of(fn) if use_graph else fn, **timing)
    except Exception as error:  # a path that cannot run here is reported, not fatal
        return f"failed: {type(error).__name__}: {str(error)[:80]}"


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    delta = (out.float() - ref.float()).abs()
    finite = bool(torch.isfinite(out).all())
    relative = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    return {"max_abs": float(delta.max()), "relative": relative if finite else float("inf")}


def run_token_count(args, ceilings: Ceilings, layer: Layer, tokens: int) -> Row:
    from grokserve.model.kernels.moe_triton import fused_moe

    router, ids = layer.router, layer.expert_ids
    model, ffn = layer.bf16[0].shape[1], layer.shape.ffn
    x = torch.randn(tokens, model, dtype=torch.bfloat16, device=router.device)
    gates, experts = layers.route(x, router, args.top_k)
    held_pairs = int((experts < layer.shape.held).sum())
    hit = int(torch.unique(experts[experts < layer.shape.held]).numel())
    flops = 2 * held_pairs * 3 * model * ffn
    activations = 2 * tokens * model * 2
    bf16_bytes = hit * 3 * model * ffn * 2 + activations
    int8_bytes = hit * 3 * model * ffn + activations

    def routed(moe: Callable, *matrices) -> Callable[[], object]:
        def call():
            g, e = layers.route(x, router, args.top_k)
            return moe(x, g, e, *matrices, ids)

        return call

    graphs = router.is_cuda and tokens <= args.graph_max
    dispatched = {dtype: kernels.moe_path(x, *layer.weights(dtype)) for dtype in DTYPES}
    # (call, CUDA-graph capturable): both baselines synchronise with the host (nonzero, bincount),
    # and so does the dispatcher's loop (under a capture the dispatcher would run the fused kernel).
    paths = {
        "fused bf16": (routed(fused_moe, *layer.bf16), graphs),
        "fused int8": (routed(fused_moe, *layer.int8), graphs),
        "per-expert loop": (routed(layers.moe, *layer.bf16), False),
        "grouped_mm": (routed(grouped_mm_moe, *layer.bf16), False),
        **{
            f"dispatched {dtype}": (
                routed(kernels.moe, *layer.weights(dtype)),
                graphs and dispatched[dtype] == "fused",
            )
            for dtype in DTYPES
        },
    }
    # The int8 paths must equal the bf16 reference on the dequantised weights.
    dequantized = [w.dequantize(torch.bfloat16) for w in layer.int8]
    references = {
        "bf16": layers.moe(x, gates, experts, *layer.bf16, ids),
        "int8": layers.moe(x, gates, experts, *dequantized, ids),
    }
    del dequantized
    errors = {
        f"{path} {dtype}": compare(moe(x, gates, experts, *layer.weights(dtype), ids), reference)
        for dtype, reference in references.items()
        for path, moe in (("fused", fused_moe), ("dispatched", kernels.moe))
    }
    del references
    print(f"# {layer.shape} {tokens} tokens: {dispatched} vs reference {errors}", flush=True)
    timings = {name: time_path(fn, graph) for name, (fn, graph) in paths.items()}
    for name, error in errors.items():
        if not error["relative"] < MAX_RELATIVE_ERROR:
            timings[name] = f"WRONG: relative error {error['relative']:.3g}"
    return Row(
        str(layer.shape),
        tokens,
        ceilings.roofline_ms(bf16_bytes, flops),
        ceilings.roofline_ms(int8_bytes, flops),
        timings,
        errors,
        dispatched,
    )


def milliseconds(measured: float | str) -> str:
    return f"{measured:.4f} ms" if isinstance(measured, float) else measured


def fraction(roofline: float, measured: float | str) -> str:
    return f"{roofline / measured:.2f}" if isinstance(measured, float) else "-"


def print_table(rows: list[Row]) -> None:
    names = list(rows[0].timings_ms)
    checked = list(rows[0].errors)
    anchors = ["anchor loop", "anchor grouped_mm", "anchor public bf16", "anchor public int8"]
    header = ["shape", "tokens", "roofline ms", *[f"{n} ms (frac)" for n in names]]
    header += ["int8/bf16 speed-up", *[f"max|Δ| {n}" for n in checked], *anchors]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        cells = [row.shape, str(row.tokens), f"{row.roofline_ms:.3f}"]
        for name in names:
            measured = row.timings_ms[name]
            roof = row.int8_roofline_ms if "int8" in name else row.roofline_ms
            cell = (
                f"{measured:.3f} ({fraction(roof, measured)})"
                if isinstance(measured, float)
                else measured
            )
            if name.startswith("dispatched "):
                cell += f" {row.dispatched[name.removeprefix('dispatched ')]}"
            cells.append(cell)
        bf16, int8 = row.timings_ms["fused bf16"], row.timings_ms["fused int8"]
        both = isinstance(bf16, float) and isinstance(int8, float)
        cells.append(f"{bf16 / int8:.2f}x" if both else "-")
        cells += [f"{row.errors[n]['max_abs']:.3g}" for n in checked]
        full = row.shape == FULL_WIDTH and row.tokens in ANCHORS
        cells += list(ANCHORS[row.tokens]) if full else ["-"] * len(anchors)
        print("| " + " | ".join(cells) + " |", flush=True)


# The sweep: coordinate descent from the table's entry, one choice at a time (row block, grouping,
# gate_up tile, down tile), over a space that includes row blocks and GROUP_M values the first sweep
# (16 rows ≤ 64 tokens, 64/128 above; GROUP_M 1 or 8) could not reach. Tiles are (BLOCK_N, BLOCK_K,
# warps, stages).
DECODE_ROW_BLOCKS = (16, 32)
PREFILL_ROW_BLOCKS = (32, 64, 128)
DECODE_GROUPS = (1,)  # about one row block per expert: the launch order hardly matters
PREFILL_GROUPS = (1, 8, 16)
DECODE_TILES = ((64, 128, 4, 4), (32, 128, 4, 4), (128, 128, 4, 3), (32, 256, 4, 3))
# (256-wide gate_up tiles at 128 rows spilled in the sm_90 build; 3 stages of 128 × 128 do not fit.)
PREFILL_TILES = ((128, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 4, 3))


def _with_gate_up(config: MoeTileConfig, tile: tuple[int, ...]) -> MoeTileConfig:
    n, k, warps, stages = tile
    return replace(
        config, gate_up_block_n=n, gate_up_block_k=k, gate_up_warps=warps, gate_up_stages=stages
    )


def _with_down(config: MoeTileConfig, tile: tuple[int, ...]) -> MoeTileConfig:
    n, k, warps, stages = tile
    return replace(config, down_block_n=n, down_block_k=k, down_warps=warps, down_stages=stages)


def _regime(tokens: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]:
    if tokens <= 64:
        return DECODE_ROW_BLOCKS, DECODE_GROUPS, DECODE_TILES
    return PREFILL_ROW_BLOCKS, PREFILL_GROUPS, PREFILL_TILES


def descent_steps(tokens: int) -> list[Callable[[MoeTileConfig], list[MoeTileConfig]]]:
    row_blocks, groups, tiles = _regime(tokens)
    return [
        lambda c: [replace(c, block_m=bm) for bm in row_blocks],
        lambda c: [replace(c, group_m=gm) for gm in groups],
        lambda c: [_with_gate_up(c, tile) for tile in tiles],
        lambda c: [_with_down(c, tile) for tile in tiles],
    ]


def sweep_space(tokens: int) -> list[MoeTileConfig]:
    """Configurations that together compile every kernel variant the descent can launch: each
    kernel is compiled per (row block, grouping, its own tile), so the gate_up and down tiles can be
    paired off instead of crossed."""
    start = pick_config(tokens)
    row_blocks, groups, tiles = _regime(tokens)
    own = (start.gate_up_block_n, start.gate_up_block_k, start.gate_up_warps, start.gate_up_stages)
    return [
        _with_down(_with_gate_up(replace(start, block_m=bm, group_m=gm), tile), tile)
        for bm in row_blocks
        for gm in (*groups, start.group_m)
        for tile in (*tiles, own)
    ]


def _warm_compile(job: tuple) -> str:
    """Runs one configuration at a small size with the real call's specialisation (ints divisible by
    16, the same token count, experts and constexprs), which fills Triton's on-disk cache."""
    device_name, model, ffn, held, tokens, dtype, config_fields = job
    from grokserve.model.kernels.moe_triton import fused_moe

    device = torch.device(device_name)
    args = argparse.Namespace(model=model, experts=8, top_k=2)
    layer = Layer(args, device, Shape(held, ffn))
    x = torch.randn(tokens, model, dtype=torch.bfloat16, device=device)
    gates, experts = layers.route(x, layer.router, 2)
    config = MoeTileConfig(**config_fields)
    try:
        fused_moe(x, gates, experts, *layer.weights(dtype), layer.expert_ids, config)
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:80]}"
    return "ok"


def start_warm_compiles(args, device: torch.device, shapes: list[Shape]):
    """Compiles the sweep space on --compile-workers processes while the sweep times what is ready
    (Triton compiles on the CPU; the machine has many cores and the sweep's time is mostly compile)."""
    # Every BLOCK_K of the space divides D and F/8 of the warm-up size as it does the real ones; one
    # token (2 pairs) specialises differently from the others (multiples of 16 pairs).
    model, ffn = (args.model, 128) if device.type == "cpu" else (256, 2048)
    jobs = {}
    # The table's own entries first (the benchmark rows use them), then the sweep's order.
    for space in (lambda tokens: [pick_config(tokens)], sweep_space):
        for held in dict.fromkeys(s.held for s in shapes):  # F does not change the kernel
            for dtype in ("bf16", "int8"):
                for tokens in args.tokens:
                    for config in space(tokens):
                        key = (held, dtype, tokens == 1, config)
                        job = (str(device), model, ffn, held, tokens, dtype, asdict(config))
                        jobs.setdefault(key, job)
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(args.compile_workers, mp_context=context)
    print(f"# sweep: compiling {len(jobs)} variants on {args.compile_workers} workers", flush=True)
    futures = [pool.submit(_warm_compile, job) for job in jobs.values()]
    return pool, futures


def precompile(args, device: torch.device, shapes: list[Shape]) -> int:
    """Only the sweep's compiles (gpu_check.sh runs this beside the CUDA tests, whose compiles
    leave most cores idle); the sweep then finds the kernels in Triton's cache."""
    started = time.monotonic()
    pool, futures = start_warm_compiles(args, device, shapes)
    results = [future.result() for future in futures]
    pool.shutdown()
    failed = [r for r in results if r != "ok"]
    print(
        f"# precompiled {len(results)} variants in {time.monotonic() - started:.0f} s, "
        f"{len(failed)} failed{': ' + failed[0] if failed else ''}",
        flush=True,
    )
    return 0


def sweep(args, device: torch.device, shapes: list[Shape]) -> int:
    """Per (experts per GPU, F, dtype, tokens): the best configuration the descent finds within
    --sweep-budget-s, checked against the reference; entries go to --sweep-json as they finish."""
    from grokserve.model.kernels.moe_triton import fused_moe

    deadline = time.monotonic() + args.sweep_budget_s
    pool, futures = start_warm_compiles(args, device, shapes)
    # Timings taken while the workers start (imports on every core, small launches) would be noisy;
    # when the kernels are already in the cache, the workers are done within this wait.
    concurrent.futures.wait(futures, timeout=args.compile_wait_s)
    entries, failures = [], 0
    timing = {"warmup_ms": 5, "repeat_ms": 30}
    try:
        for shape in shapes:
            layer = Layer(args, device, shape)
            for dtype in ("bf16", "int8"):
                for tokens in args.tokens:
                    if time.monotonic() > deadline:
                        print(f"sweep: budget spent before {shape} {dtype} {tokens}", flush=True)
                        return failures
                    x = torch.randn(tokens, args.model, dtype=torch.bfloat16, device=device)
                    gates, experts = layers.route(x, layer.router, args.top_k)
                    graphs = device.type == "cuda" and tokens <= args.graph_max
                    matrices = (*layer.weights(dtype), layer.expert_ids)

                    def measure(
                        config, x=x, gates=gates, experts=experts, graphs=graphs, m=matrices
                    ):
                        call = functools.partial(fused_moe, x, gates, experts, *m, config)
                        return time_path(call, graphs, **timing)

                    start = pick_config(tokens, shape.held, shape.ffn, dtype)
                    best, best_ms = start, measure(start)
                    for step in descent_steps(tokens):
                        for candidate in step(best):
                            measured = measure(candidate)
                            if isinstance(measured, float) and (
                                not isinstance(best_ms, float) or measured < best_ms
                            ):
                                best, best_ms = candidate, measured
                    reference_weights = [
                        w.dequantize(torch.bfloat16) if isinstance(w, QuantizedWeight) else w
                        for w in layer.weights(dtype)
                    ]
                    error = compare(
                        fused_moe(x, gates, experts, *matrices, best),
                        layers.moe(x, gates, experts, *reference_weights, layer.expert_ids),
                    )
                    ok = isinstance(best_ms, float) and error["relative"] < MAX_RELATIVE_ERROR
                    failures += not ok
                    default_ms = measure(pick_config(tokens))
                    print(
                        f"sweep {shape} {dtype} tokens={tokens}: {milliseconds(best_ms)} "
                        f"(untuned table {milliseconds(default_ms)}), "
                        f"max|Δ| {error['max_abs']:.3g}, "
                        f"{'ok' if ok else 'FAILED'}: {best}",
                        flush=True,
                    )
                    if ok:
                        entries.append(
                            table_entry(
                                layer.tile_key(dtype, tokens),
                                best,
                                measured_ms=best_ms,
                                untuned_ms=default_ms,
                                max_abs_error=error["max_abs"],
                                device=device_name(device),
                            )
                        )
                        if args.sweep_json:
                            with open(args.sweep_json, "w") as out:
                                json.dump(entries, out, indent=1)
            del layer
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return failures


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--model", type=int, help="D (6144)")
    parser.add_argument(
        "--shapes", type=Shape.parse, nargs="+", help=f"EXPERTSxF per GPU ({FULL_WIDTH})"
    )
    parser.add_argument("--experts", type=int, default=8, help="experts the router chooses from")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--graph-max", type=int, default=256, help="CUDA graphs up to this many tokens"
    )
    parser.add_argument("--sweep", action="store_true", help="search tile configs instead")
    parser.add_argument("--sweep-json", help="write the sweep's table entries here")
    parser.add_argument("--sweep-budget-s", type=float, default=150.0)
    parser.add_argument("--compile-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument(
        "--compile-wait-s", type=float, default=15.0, help="the sweep's wait for its compiles"
    )
    parser.add_argument(
        "--precompile", action="store_true", help="only compile the sweep's kernels, then exit"
    )
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes, TRITON_INTERPRET=1: plumbing only"
    )
    args = parser.parse_args()
    dry = (
        DRY_RUN if args.dry_run else {"model": 6144, "shapes": [FULL_WIDTH], "tokens": TOKEN_COUNTS}
    )
    args.model = args.model or dry["model"]
    args.tokens = args.tokens or list(dry["tokens"])
    shapes = args.shapes or [Shape.parse(s) for s in dry["shapes"]]
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error(
                "--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1"
            )
        device = torch.device("cpu")
        # The dispatcher's fast path, as on a GPU (the interpreter runs the fused kernel).
        os.environ.setdefault("GROKSERVE_KERNELS", "fast")
        args.compile_workers, args.compile_wait_s = min(args.compile_workers, 1), 0.0
    else:
        require_cuda("bench/moe.py")
        device = torch.device("cuda")
    if any(t < 1 for t in args.tokens):
        parser.error("--tokens must be positive")
    if any(s.held > args.experts for s in shapes):
        parser.error("--shapes: a GPU cannot hold more experts than --experts")
    if args.compile_workers < 1:
        parser.error("--compile-workers must be at least 1")
    torch.manual_seed(0)
    if args.precompile:
        return precompile(args, device, shapes)
    if args.sweep:
        failures = sweep(args, device, shapes)
        return 1 if failures else 0
    sizes = {"copy_elements": 2**16, "matmul_size": 64} if args.dry_run else {}
    ceilings = measure_ceilings(device, **sizes)
    print(f"# {device_name(device)}: {ceilings.describe()}", flush=True)
    rows = []
    for shape in shapes:
        layer = Layer(args, device, shape)
        for tokens in args.tokens:
            rows.append(run_token_count(args, ceilings, layer, tokens))
            print(f"# {shape} {tokens} tokens done: {rows[-1].timings_ms}", flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                with open(args.json, "w") as out:
                    rows_json = [asdict(r) for r in rows]
                    json.dump({"ceilings": asdict(ceilings), "rows": rows_json}, out, indent=1)
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    wrong = [r for r in rows if any(str(t).startswith("WRONG") for t in r.timings_ms.values())]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
