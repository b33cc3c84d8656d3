"""The GPU benchmarks refuse to start without CUDA, saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the benchmark would run")
@pytest.mark.parametrize("script", ["moe.py", "decode.py"])
def test_kernels_bench_fails_fast_without_cuda(script):
    result = subprocess.run(
        [sys.executable, str(BENCH / script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert result.returncode == 1
    assert f"bench/{script}: needs an NVIDIA GPU with CUDA" in result.stderr
