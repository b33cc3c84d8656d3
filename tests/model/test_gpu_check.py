"""`bench/gpu_check.sh --dry-run`: the one-shot GPU check's plumbing on the CPU (Triton's interpreter,
tiny sizes), so that the script still runs when GPU time comes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grokserve.model.kernels import tuning

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="the triton package is not installed (pip install triton)",
)
def test_gpu_check_dry_run_writes_every_result(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "PYTHON": sys.executable},
    )
    log = (tmp_path / "log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert "gpu_check done: 0 step(s) failed" in log
    for step in ("pytest", "moe_full", "moe_deployed", "decode", "sweep"):
        assert f"=== {step}: exit 0" in log
    rows = json.loads((tmp_path / "moe_full.json").read_text())["rows"]
    assert [(r["shape"], r["tokens"]) for r in rows] == [("4x128", 1), ("4x128", 8)]
    assert all(error["max_abs"] < 1e-2 for r in rows for error in r["errors"].values())
    # The step moves the crossover to 8 tokens: the dispatcher runs the fused kernel, then the loop.
    assert [r["dispatched"] for r in rows] == [
        {"bf16": "fused", "int8": "fused"},
        {"bf16": "loop", "int8": "loop"},
    ]
    deployed = json.loads((tmp_path / "moe_deployed.json").read_text())["rows"]
    assert [(r["shape"], r["tokens"]) for r in deployed] == [("1x128", 8)]
    # The engine's decode step, eager and in the CUDA graph's place, for both weights and batches.
    decode = (tmp_path / "decode.txt").read_text()
    assert "the eager step stands in for the CUDA graph" in decode
    rows = [line.split("|")[1:-1] for line in decode.splitlines() if line.startswith("| int8 ")]
    rows += [line.split("|")[1:-1] for line in decode.splitlines() if line.startswith("| bf16 ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("int8", "1"),
        ("int8", "2"),
        ("bf16", "1"),
        ("bf16", "2"),
    ]
    assert all(r[6].strip() == "0" and r[7].strip() == "0" for r in rows)  # no Δ, same ids
    # The sweep's table loads into tuning.py and answers for its key.
    monkeypatch.setattr(tuning, "MEASURED_CONFIGS", {})
    table = tuning.load_tile_table(tmp_path / "moe_tiles.json")
    key = tuning.TileKey(1, 128, "bf16", 1)
    assert key in table
    assert tuning.pick_config(1, 1, 128, "bf16") == table[key]
    assert len(list(tmp_path.iterdir())) <= 8
