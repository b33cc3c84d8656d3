"""Shared parts of `bench/moe.py` and `bench/decode.py`: the device's two ceilings, measured in the same
run, and median timings (optionally of a CUDA-graph replay).

On the CPU (the benchmarks' `--dry-run`, which checks their plumbing at tiny sizes under Triton's
interpreter) timings are host-clock medians of a few calls: they say nothing about speed."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def require_cuda(script: str) -> None:
    """Exit at once, with the reason, where the benchmark cannot run."""
    if not torch.cuda.is_available():
        sys.exit(
            f"{script}: needs an NVIDIA GPU with CUDA; torch sees none (torch {torch.__version__})"
        )
    try:
        import triton  # noqa: F401  (CUDA builds of torch ship it)
    except ImportError:
        sys.exit(f"{script}: needs triton (it ships with CUDA builds of torch)")


def median_ms(fn: Callable[[], object], warmup_ms: int = 50, repeat_ms: int = 300) -> float:
    if not torch.cuda.is_available():
        return _host_median_ms(fn)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=repeat_ms, return_mode="median"))


def _host_median_ms(fn: Callable[[], object], calls: int = 1) -> float:
    fn()
    durations = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        durations.append(1e3 * (time.perf_counter() - start))
    return statistics.median(durations)


def graph_of(fn: Callable[[], object]) -> Callable[[], None]:
    """A replay of `fn` captured in a CUDA graph (fn must not synchronise with the host)."""
    fn()  # compile and allocate outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float

    def roofline_ms(self, bytes_moved: float, flops: float) -> float:
        return 1e3 * max(bytes_moved / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)

    def describe(self) -> str:
        return (
            f"copy {self.copy_bytes_per_s / 1e12:.2f} TB/s (read + write), "
            f"bf16 matmul {self.matmul_flops_per_s / 1e12:.0f} TFLOP/s"
        )


def measure_ceilings(
    device: torch.device, copy_elements: int = 2**30, matmul_size: int = 8192
) -> Ceilings:
    """Device-to-device copy of 2 GiB (bytes read plus written) and an 8192³ bf16 matmul (smaller
    sizes for a dry run)."""
    return Ceilings(_copy_rate(device, copy_elements), _matmul_rate(device, matmul_size))


def _copy_rate(device: torch.device, elements: int) -> float:
    source = torch.randn(elements, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / (copy_ms / 1e3)


def _matmul_rate(device: torch.device, size: int) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    matmul_ms = median_ms(lambda: a @ b)
    return 2 * size**3 / (matmul_ms / 1e3)
