"""Decode step of a 4-layer full-width Grok-1 slice on an NVIDIA GPU, against its roofline (issue 4).

    python bench/decode.py [--batch 1 8 64] [--context 1024] [--layers 4]

The slice is the real model with `--layers` layers (attention, four norms, router, 8 experts each) plus
the embedding and the tied output projection, random weights, a KV cache already holding `--context`
tokens per row. One step = one new token per row through `GrokModel.forward`, timed eagerly (the
model's step bookkeeping reads positions back to the host, so it is not graph-capturable yet), on
the fast kernels (the default on CUDA) and on the reference path (GROKSERVE_KERNELS=reference), in
bf16 and with the int8 weights.

Roofline = max(bytes / copy bandwidth, FLOPs / matmul peak), both measured in this run, where bytes
are every matrix a step must read once (attention and output projections, the experts the step's
tokens hit in each layer, the embedding for the logits) plus the KV cache rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from grokserve.model.kernels.benchmarking import Ceilings, measure_ceilings, median_ms, require_cuda
from grokserve.model.presets import preset
from grokserve.model.quantization import QuantizedWeight
from grokserve.model.transformer import GrokModel


def random_model(layers: int, quantization: str | None, device: torch.device) -> GrokModel:
    """Random weights drawn on the device (a CPU draw of ~40 GB would take minutes)."""
    config = dataclasses.replace(preset("grok-1"), num_layers=layers)
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


def time_step(model: GrokModel, batch: int, context: int, mode: str) -> tuple[float, list[int]]:
    os.environ["GROKSERVE_KERNELS"] = mode
    cache = filled_cache(model, batch, context)
    tokens = torch.randint(3, model.config.vocab_size, (batch, 1), device=cache.lengths.device)

    def step():
        cache.lengths.fill_(context)
        return model(tokens, cache)

    before = model.expert_token_counts()
    step()
    hit = [int(n) for n in ((model.expert_token_counts() - before) > 0).sum(dim=1)]
    return median_ms(step, warmup_ms=200, repeat_ms=1000), hit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    require_cuda("bench/decode.py")
    if min(args.batch) < 1 or args.context < 1 or args.layers < 1:
        parser.error("--batch, --context and --layers must be positive")
    device = torch.device("cuda")
    torch.manual_seed(0)
    ceilings: Ceilings = measure_ceilings(device)
    print(f"# {torch.cuda.get_device_name(device)}: {ceilings.describe()}", flush=True)
    print("| weights | batch | roofline ms | fast ms (frac) | reference ms (frac) |")
    print("| --- | --- | --- | --- | --- |")
    for quantization in (None, "int8"):
        model = random_model(args.layers, quantization, device)
        for batch in args.batch:
            fast_ms, hit = time_step(model, batch, args.context, "auto")
            reference_ms, _ = time_step(model, batch, args.context, "reference")
            roofline = ceilings.roofline_ms(*step_bytes_and_flops(model, batch, args.context, hit))
            print(
                f"| {quantization or 'bf16'} | {batch} | {roofline:.3f} | "
                f"{fast_ms:.3f} ({roofline / fast_ms:.2f}) | "
                f"{reference_ms:.3f} ({roofline / reference_ms:.2f}) |",
                flush=True,
            )
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
