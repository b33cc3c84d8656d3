"""From how many tokens the per-expert cuBLAS loop beats the fused Triton MoE: the one table.

Measured by `bench/gpu_check.sh` on one H200 (docs/kernels.md, "Measured on one H200"), keyed by the
GPU's expert stack (experts held, F) and the weight dtype. The loop pays a host sync per expert and
cannot be captured, but at prefill sizes cuBLAS's large-tile matmuls outrun the fused kernel (full
width, 1024 tokens: loop 4.95 ms, fused bf16 5.90 ms). For int8 the loop first dequantises each
expert it runs (the project's chunked `dequantize`, one expert at a time), which pays off only
where the W8A16 kernel is furthest behind (16384 tokens).

A stack not in the table keeps the fused kernel at every size, and so does a compiled or
CUDA-graph-captured step (the loop synchronises with the host per expert).
`GROKSERVE_MOE_LOOP_FROM=<tokens>` replaces every entry (for benchmarks and tests); unset, the
table applies.
"""

from __future__ import annotations

import os

LOOP_FROM_ENV = "GROKSERVE_MOE_LOOP_FROM"

# (experts held, F, weight dtype) -> smallest token count that runs the per-expert loop. The int8
# entries add the estimated dequantisation of every expert hit to the bf16 loop's time: `dequantize`
# goes through float32 (int8 -> f32, a gathered bf16 scale row, the multiply, f32 -> bf16), about
# 25 bytes read + written per weight element, at the measured 4.25 TB/s copy rate.
LOOP_FROM_TOKENS: dict[tuple[int, int, str], int] = {
    # Full layer on one GPU: loop 4.95 vs fused 5.90 ms at 1024, 16.9 vs 19.9 at 4096, 62.8 vs 75.4
    # at 16384; the fused kernel wins up to 256 (2.71 vs 3.44 ms).
    (8, 32768, "bf16"): 1024,
    # Dequantising 4.8 G elements: ~28 ms. 62.8 + 28 ≈ 91 vs fused int8 126 ms at 16384; at 4096,
    # 16.9 + 28 ≈ 45 > 31.7.
    (8, 32768, "int8"): 16384,
    # One expert per GPU: the loop wins from 64 tokens (0.43 vs 0.65 ms; 0.81 vs 1.30 at 1024).
    (1, 32768, "bf16"): 64,
    # ~3.5 ms of dequantisation (0.6 G elements): 10.0 + 3.5 vs fused int8 22.0 ms at 16384; at
    # 4096, 2.7 + 3.5 ≈ 6.2 ≈ 6.17 (no gain).
    (1, 32768, "int8"): 16384,
    # 8 × F/8 (the tensor-parallel slice): the fused kernel wins at every size in bf16 (9.9 vs 10.7
    # ms at 16384). int8: 10.7 + ~3.5 ≈ 14.2 vs fused int8 16.0 ms at 16384, the thinnest margin
    # of the table; at 4096, 3.3 + 3.5 > 4.4.
    (8, 4096, "int8"): 16384,
}


def loop_from_tokens(experts: int, ffn: int, dtype: str) -> int | None:
    """The threshold for this stack (None: always the fused kernel), or the override's."""
    override = os.environ.get(LOOP_FROM_ENV)
    if override is not None:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(
                f"{LOOP_FROM_ENV} must be a positive token count, got {override!r}; "
                "unset it to use the measured table"
            )
        return int(override)
    return LOOP_FROM_TOKENS.get((experts, ffn, dtype))


def runs_loop(tokens: int, experts: int, ffn: int, dtype: str) -> bool:
    threshold = loop_from_tokens(experts, ffn, dtype)
    return threshold is not None and tokens >= threshold
