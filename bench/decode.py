"""Decode step of a 4-layer full-width Grok-1 slice on an NVIDIA GPU, against its roofline (issues 4, 17).

    python bench/decode.py [--batch 1 8 64] [--context 1024] [--layers 4] [--dry-run]

The slice is the real model with `--layers` layers (attention, four norms, router, 8 experts each) plus
the embedding and the tied output projection, random weights, a KV cache already holding `--context`
tokens per row. One step = one new token per row through `GrokModel.forward`, timed eagerly (the
model's step bookkeeping reads positions back to the host, so it is not graph-capturable yet), on
the fast kernels (the default on CUDA) and on the reference path (GROKSERVE_KERNELS=reference), in
bf16 and with the int8 weights.

Roofline = max(bytes / copy bandwidth, FLOPs / matmul peak), both measured in this run, where bytes
are every matrix a step must read once (attention and output projections, the experts the step's
tokens hit in each layer, the embedding for the logits) plus the KV cache rows.

Eager against CUDA graph: `GrokModel.forward` synchronises with the host (token checks, the step's
positions and span), so the whole step cannot be captured yet (a no-host-sync decode step is being
built under issue 17; CUDA's sync debug mode names the step's first host sync, without a capture
attempt). What is captured
today, on the same modules, with the step's positions prepared outside the graph: (1) the decoder
layers (attention with the cache write, four norms, router, fused MoE), and where that capture fails,
(2) the MoE blocks alone. Each is timed eagerly and as a graph replay, and the replay's output is
compared with the eager one (max |Δ|).

`--dry-run` runs the same code at `grok-tiny` size on the CPU (no graphs, no meaningful times).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from grokserve.model.kernels.benchmarking import (
    Ceilings,
    graph_of,
    measure_ceilings,
    median_ms,
    require_cuda,
)
from grokserve.model.presets import preset
from grokserve.model.quantization import QuantizedWeight
from grokserve.model.transformer import GrokModel, Step

STEP_TABLE_HEADER = (
    "| weights | batch | roofline ms | fast ms (frac) | reference ms (frac) | logits max|Δ| |\n"
    "| --- | --- | --- | --- | --- | --- |"
)


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


def filled_cache(model: GrokModel, batch: int, context: int):
    cache = model.new_cache(batch, context + 1)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys.normal_()
        values.normal_()
    cache.key_valid[:, :context] = True
    cache.lengths.fill_(context)
    return cache


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


def time_step(
    model: GrokModel, batch: int, context: int, mode: str
) -> tuple[float, list[int], torch.Tensor]:
    """Median step time, experts hit per layer, and the step's logits (the same cache and tokens
    for every mode: both are drawn from a seed of the batch size)."""
    os.environ["GROKSERVE_KERNELS"] = mode
    torch.manual_seed(batch)
    cache = filled_cache(model, batch, context)
    tokens = torch.randint(3, model.config.vocab_size, (batch, 1), device=cache.lengths.device)

    def step():
        cache.lengths.fill_(context)
        return model(tokens, cache)

    before = model.expert_token_counts()
    logits = step()
    hit = [int(n) for n in ((model.expert_token_counts() - before) > 0).sum(dim=1)]
    return median_ms(step, warmup_ms=100, repeat_ms=400), hit, logits


def captured_parts(model: GrokModel, batch: int, context: int) -> None:
    """Eager against CUDA-graph replay of what can be captured today (see the module docstring)."""
    os.environ["GROKSERVE_KERNELS"] = "auto"  # the fast path on CUDA (time_step left it set)
    cache = filled_cache(model, batch, context)
    device = cache.lengths.device
    tokens = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    x = model.embed(tokens)
    with torch.inference_mode():
        step = Step(tokens, model.config.pad_token, cache, None)  # host syncs happen here, once

        def decoder_layers():
            h = x
            for index, layer in enumerate(model.layers):
                h = layer(h, step, index)
            return h

        def moe_blocks():
            h = x
            for layer in model.layers:
                h = h + layer.post_moe_norm(layer.moe(layer.pre_moe_norm(h), step))
            return h

        for name, part in (("decoder layers", decoder_layers), ("MoE blocks", moe_blocks)):
            eager_ms = median_ms(part, warmup_ms=100, repeat_ms=500)
            if device.type != "cuda":
                print(f"| {name} | {batch} | {eager_ms:.3f} | - (no CUDA: not captured) | - | - |")
                continue
            try:
                replay = graph_of(part)
            except Exception as error:
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"
                print(f"| {name} | {batch} | {eager_ms:.3f} | not capturable: {reason} | - | - |")
                continue
            graph_ms = median_ms(replay, warmup_ms=100, repeat_ms=500)
            # The static output of a replay against an eager call.
            static = _last_output(part)
            delta = float((static.float() - part().float()).abs().max())
            print(
                f"| {name} | {batch} | {eager_ms:.3f} | {graph_ms:.3f} | "
                f"{eager_ms / graph_ms:.2f}x | {delta:.3g} |",
                flush=True,
            )
            if name == "decoder layers":
                break  # the MoE blocks are inside it
    if device.type == "cuda":
        print(
            f"| whole step | {batch} | - | {first_host_sync(model, cache, tokens, context)} | - | - |"
        )


def first_host_sync(model: GrokModel, cache, tokens: torch.Tensor, context: int) -> str:
    """Whether the whole step runs without a host sync (the condition for capturing it), found
    without a capture attempt: CUDA's sync debug mode raises at the first synchronising call."""
    cache.lengths.fill_(context)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(tokens, cache)
    except RuntimeError as error:
        return f"not capturable yet, host sync: {str(error).splitlines()[0][:90]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no host sync: capturable (not timed here)"


def _last_output(part) -> torch.Tensor:
    """The output of a replay: captured once more into a graph that keeps the output tensor."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = part()
    graph.replay()
    torch.cuda.synchronize()
    return out.clone()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--dry-run", action="store_true", help="grok-tiny on the CPU: plumbing only, no timings"
    )
    args = parser.parse_args()
    if min(args.batch) < 1 or args.context < 1 or args.layers < 1:
        parser.error("--batch, --context and --layers must be positive")
    if args.dry_run:
        device, name, sizes = (
            torch.device("cpu"),
            "grok-tiny",
            {"copy_elements": 2**16, "matmul_size": 64},
        )
        args.context = min(args.context, preset(name).sequence_len - 1)
    else:
        require_cuda("bench/decode.py")
        device, name, sizes = torch.device("cuda"), "grok-1", {}
    torch.manual_seed(0)
    ceilings: Ceilings = measure_ceilings(device, **sizes)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"# {label}: {ceilings.describe()}", flush=True)
    print(STEP_TABLE_HEADER)
    # int8 first: the capture attempts run last, so that a failed one cannot disturb other rows.
    for quantization in ("int8", None):
        model = random_model(args.layers, quantization, device, name)
        for batch in args.batch:
            fast_ms, hit, fast = time_step(model, batch, args.context, "auto")
            reference_ms, _, reference = time_step(model, batch, args.context, "reference")
            roofline = ceilings.roofline_ms(*step_bytes_and_flops(model, batch, args.context, hit))
            delta = float((fast - reference).abs().max())
            print(
                f"| {quantization or 'bf16'} | {batch} | {roofline:.3f} | "
                f"{fast_ms:.3f} ({roofline / fast_ms:.2f}) | "
                f"{reference_ms:.3f} ({roofline / reference_ms:.2f}) | {delta:.3g} |",
                flush=True,
            )
        if quantization is None:
            print(
                "\n| captured part (bf16, fast path) | batch | eager ms | CUDA graph ms | speed-up | max abs diff |"
            )
            print("| --- | --- | --- | --- | --- | --- |")
            for batch in args.batch:
                captured_parts(model, batch, args.context)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
