"""The serving engine's decode step on a 4-layer full-width Grok-1 slice: eager against CUDA graph
(issues 4, 17).

    python bench/decode.py [--batch 1 8 64] [--context 1024] [--layers 4] [--max-len N] [--compile]
                           [--dry-run]

The slice is the real model with `--layers` layers (attention, four norms, router, 8 experts each) plus
the embedding and the tied output projection, random weights, and a paged KV cache (16-token blocks,
each row's blocks scattered over the pool) already holding `--context` tokens per row. One step is
what the serving executor runs per decode step: `engine_step` (one new token per row through
`GrokModel.forward_paged`, greedy sampling on the device). Per weights (int8, then bf16) and batch it
is timed
- eagerly (`engine_step`),
- as `CudaGraphDecode`'s replay (the executor's CUDA path: the inputs copied into the batch bucket's
  static buffers, one graph replay, the next ids copied out; captured on first use, after a warm-up
  on a side stream),
- with `--compile`, as `torch.compile(engine_step, fullgraph=True)` (its first call's compile time
  beside it; off by default, it is not in `bench/gpu_check.sh`'s time box),
on the fast kernels (the default on CUDA), with the roofline, the ratio graph/eager, and the max |Δ|
of the float32 logits and the count of next ids that differ between the eager step and the replay
(the replay's logits are read from the graph's own output buffer).

Block-table widths as the serving executor sets them: the eager step's tables list the blocks the
rows use; the graph's have the width of `--max-len` (the server's `--max-sequence-length`), the
unused columns pointing at the null block, and attention gathers every column. The default
`--max-len` is the context plus the step's token, where both widths are equal.

Roofline = max(bytes / copy bandwidth, FLOPs / matmul peak), both measured in this run, where bytes
are every matrix a step must read once (attention and output projections, the experts the step's
tokens hit in each layer, the embedding for the logits) plus the KV cache's rows read once.

`--dry-run` runs the same code at `grok-tiny` size on the CPU, with the eager step in place of the
CUDA graph (CUDA graphs need CUDA; the output says so); its times mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import torch

from grokserve.model.blocks import DEFAULT_BLOCK_SIZE, NULL_BLOCK, blocks_for
from grokserve.model.engine_step import CudaGraphDecode, StepSampling, engine_step
from grokserve.model.kernels.benchmarking import (
    Ceilings,
    measure_ceilings,
    median_ms,
    require_cuda,
)
from grokserve.model.paged import PagedKVCache
from grokserve.model.presets import preset
from grokserve.model.quantization import QuantizedWeight
from grokserve.model.transformer import GrokModel

TABLE_HEADER = (
    "| weights | batch | roofline ms | eager ms (frac) | CUDA graph ms (frac) | graph/eager "
    "| logits max|Δ| | ids differing | compiled ms (compile s, ids differing) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)
NO_GRAPH = "no CUDA: the eager step stands in for the CUDA graph"


def random_model(
    layers: int, quantization: str | None, device: torch.device, name: str = "grok-1"
) -> GrokModel:
    """Random weights drawn on the device (a CPU draw of ~40 GB would take minutes)."""
    config = dataclasses.replace(preset(name), num_layers=layers)
    model = GrokModel(config, torch.bfloat16, device, quantization)
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            fan_in = module.weight.shape[-2]
            module.weight.random_(-127, 128)
            module.scales.fill_(3 / (127 * fan_in**0.5))
    for name, tensor in model.state_dict().items():
        if tensor.dtype == torch.int8 or name.endswith("scales"):
            continue
        if name.endswith("scale"):
            tensor.fill_(1.0)
        elif name.endswith("router") or name.startswith("embed"):
            tensor.normal_()
        elif tensor.is_floating_point():
            tensor.normal_(0, tensor.shape[-2] ** -0.5)
    return model


class LogitsTap:
    """The model as `engine_step` sees it, keeping the logits `forward_paged` last returned: after a
    CUDA-graph capture, the graph's own logits buffer, which every replay refills."""

    def __init__(self, model: GrokModel) -> None:
        self.model, self.config = model, model.config
        self.logits: torch.Tensor | None = None

    def forward_paged(self, *args, **kwargs) -> torch.Tensor:
        self.logits = self.model.forward_paged(*args, **kwargs)
        return self.logits


def filled_cache(
    model: GrokModel, rows: int, context: int, max_len: int
) -> tuple[PagedKVCache, torch.Tensor]:
    """A cache whose every row holds `context` random tokens' keys and values in blocks scattered
    over the pool, and the block tables [rows, blocks for max_len]: the blocks for context + 1 tokens
    (room for the step's token), then the null block."""
    used = blocks_for(context + 1, DEFAULT_BLOCK_SIZE)
    cache = model.new_paged_cache(rows * used, DEFAULT_BLOCK_SIZE)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys.normal_()
        values.normal_()
    # Block 0 is the null block: the tables list 1..num_blocks in a random order.
    tables = torch.full(
        (rows, blocks_for(max_len, DEFAULT_BLOCK_SIZE)), NULL_BLOCK, device=cache.device
    )
    tables[:, :used] = torch.randperm(cache.num_blocks, device=cache.device).view(rows, used) + 1
    return cache, tables


def decode_inputs(model: GrokModel, tables: torch.Tensor, batch: int, context: int) -> list:
    """engine_step's inputs after the cache: one random token per row at position `context`
    (`tables` as wide as the caller wants them)."""
    device = tables.device
    return [
        torch.randint(3, model.config.vocab_size, (batch, 1), device=device),
        torch.full((batch, 1), context, dtype=torch.long, device=device),
        tables[:batch],
        torch.full((batch,), context + 1, dtype=torch.long, device=device),
        StepSampling.greedy(batch, device),
    ]


def step_bytes_and_flops(model: GrokModel, batch: int, context: int, experts_hit: list[int]):
    c = model.config
    weight_bytes = 1 if model.quantization else 2
    d, k = c.emb_size, c.key_size
    attention = (
        d * (c.num_q_heads + 2 * c.num_kv_heads) * k + c.num_q_heads * k * d
    ) * weight_bytes
    expert = 3 * d * c.ffn_size * weight_bytes
    cache = batch * context * 2 * c.num_kv_heads * k * 2
    head = c.vocab_size * d * 2  # the tied embedding stays bf16
    total = sum(attention + hit * expert + cache for hit in experts_hit) + head
    matmul_params = c.num_layers * (
        attention // weight_bytes + c.num_selected_experts * expert // weight_bytes
    )
    flops = 2 * batch * (matmul_params + c.vocab_size * d)
    flops += c.num_layers * 4 * batch * context * c.num_q_heads * k
    return total, flops


class GraphSteps:
    """`CudaGraphDecode` over the tap, remembering each bucket's logits buffer; on the CPU, the eager
    step in its place."""

    def __init__(self, tap: LogitsTap, cache: PagedKVCache, max_blocks: int) -> None:
        self.tap, self.cache = tap, cache
        self.graphs = (
            CudaGraphDecode(tap, cache, max_blocks) if cache.device.type == "cuda" else None
        )
        self._logits: dict[int, torch.Tensor] = {}

    def step(self, inputs: list) -> torch.Tensor:
        if self.graphs is None:
            return engine_step(self.tap, self.cache, *inputs)
        return self.graphs(*inputs)

    def logits(self, inputs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One step -> (next ids, logits), capturing the batch's bucket first where it is new."""
        batch = inputs[0].shape[0]
        if self.graphs is None:
            return self.step(inputs), self.tap.logits
        bucket = self.graphs.bucket(batch)
        if bucket not in self._logits:
            self.step(inputs)  # the capture: the tap's last logits are the graph's buffer
            self._logits[bucket] = self.tap.logits
        ids = self.step(inputs)
        return ids, self._logits[bucket][:batch].clone()


def timed_compile(model: GrokModel, cache: PagedKVCache, inputs: list, compiled: Callable) -> tuple:
    """(median ms, seconds of the first call, next ids) of the compiled step."""
    started = time.perf_counter()
    compiled(model, cache, *inputs)
    if cache.device.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    ids = compiled(model, cache, *inputs)
    return median_ms(lambda: compiled(model, cache, *inputs)), compile_s, ids


def bench_weights(
    model: GrokModel,
    batches: list[int],
    context: int,
    max_len: int,
    ceilings: Ceilings,
    compile_step: bool,
) -> None:
    label = model.quantization or "bf16"
    cache, tables = filled_cache(model, max(batches), context, max_len)
    tap = LogitsTap(model)
    graphs = GraphSteps(tap, cache, tables.shape[1])
    compiled = torch.compile(engine_step, fullgraph=True) if compile_step else None
    compile_failed = False
    used = blocks_for(context + 1, DEFAULT_BLOCK_SIZE)
    for batch in batches:
        torch.manual_seed(batch)
        graph_inputs = decode_inputs(model, tables, batch, context)
        inputs = [*graph_inputs[:2], graph_inputs[2][:, :used], *graph_inputs[3:]]
        before = model.expert_token_counts()
        eager_ids = engine_step(tap, cache, *inputs)
        eager_logits = tap.logits.clone()
        hit = [int(n) for n in ((model.expert_token_counts() - before) > 0).sum(dim=1)]
        roofline = ceilings.roofline_ms(*step_bytes_and_flops(model, batch, context, hit))
        eager_ms = median_ms(lambda i=inputs: engine_step(model, cache, *i), 100, 400)
        graph_ids, graph_logits = graphs.logits(graph_inputs)
        graph_ms = median_ms(lambda i=graph_inputs: graphs.step(i), 100, 400)
        delta = float((graph_logits - eager_logits).abs().max())
        differing = int((graph_ids != eager_ids).sum())
        compiled_cell = "-"
        if compiled is not None and compile_failed:
            compiled_cell = "failed (above)"
        elif compiled is not None:
            try:
                ms, compile_s, ids = timed_compile(model, cache, inputs, compiled)
                compiled_cell = f"{ms:.3f} ({compile_s:.0f} s, {int((ids != eager_ids).sum())})"
            except Exception as error:  # a failed compile is a finding, not the end of the run
                compile_failed = True
                compiled_cell = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        print(
            f"| {label} | {batch} | {roofline:.3f} | {eager_ms:.3f} ({roofline / eager_ms:.2f}) | "
            f"{graph_ms:.3f} ({roofline / graph_ms:.2f}) | {graph_ms / eager_ms:.2f} | "
            f"{delta:.3g} | {differing} | {compiled_cell} |",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--max-len",
        type=int,
        help="the graph's block-table width in tokens, as the server's --max-sequence-length "
        "(default: context + 1)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(engine_step, fullgraph=True) (compiles the step first)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="grok-tiny on the CPU: plumbing only, no timings"
    )
    args = parser.parse_args()
    if min(args.batch) < 1 or args.context < 1 or args.layers < 1:
        parser.error("--batch, --context and --layers must be positive")
    if args.max_len is not None and args.max_len <= args.context:
        parser.error(f"--max-len must exceed --context ({args.context}), got {args.max_len}")
    if args.dry_run:
        device, name, sizes = (
            torch.device("cpu"),
            "grok-tiny",
            {"copy_elements": 2**16, "matmul_size": 64},
        )
        args.context = min(args.context, preset(name).sequence_len - 1)
        args.max_len = args.max_len and min(args.max_len, preset(name).sequence_len)
    else:
        require_cuda("bench/decode.py")
        device, name, sizes = torch.device("cuda"), "grok-1", {}
    max_len = args.max_len or args.context + 1
    torch.manual_seed(0)
    ceilings: Ceilings = measure_ceilings(device, **sizes)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"# {label}: {ceilings.describe()}", flush=True)
    print(
        f"# engine_step, context {args.context}, {args.layers} layer(s), paged cache in "
        f"{DEFAULT_BLOCK_SIZE}-token blocks, graph block tables for {max_len} tokens"
        f"{'' if device.type == 'cuda' else '; ' + NO_GRAPH}"
    )
    print(TABLE_HEADER)
    with torch.inference_mode():
        for quantization in ("int8", None):
            model = random_model(args.layers, quantization, device, name)
            bench_weights(model, args.batch, args.context, max_len, ceilings, args.compile)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
