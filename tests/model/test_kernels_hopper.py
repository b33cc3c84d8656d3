"""The fused MoE kernels compile for Hopper (sm_90) with no GPU present, and the machine code is what
the design needs: no local-memory spills, warpgroup MMA (HGMMA) at prefill tiles, 16-byte async
copies for bf16 weight tiles.

Runs `hopper_check` in a fresh process: this session may hold the kernels built for the interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def machine_code() -> list[dict]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the triton package is not installed (pip install triton)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "grokserve.model.kernels.hopper_check"]
    result = subprocess.run(
        [*command, "--json", "--buckets", "1", "16384"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "PYTHONSAFEPATH": "1", "TRITON_DEFAULT_FP_FUSION": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_kernels_hopper_every_variant_compiles_without_spills(machine_code):
    assert len(machine_code) == 8  # 2 buckets x bf16/int8 x gate_up/down
    for code in machine_code:
        assert code["stack_bytes"] == 0, code
        assert not any(i.startswith(("LDL", "STL")) for i in code["instructions"]), code


def test_kernels_hopper_prefill_uses_warpgroup_mma_and_wide_copies(machine_code):
    for code in machine_code:
        names = code["instructions"]
        if code["tokens"] == 16384:
            assert any(i.startswith("HGMMA") for i in names), code
        if code["weights"] == "bf16":
            copies = {i for i in names if i.startswith("LDGSTS")}
            assert copies == {"LDGSTS.E.BYPASS.128"}, code
