"""The MoE tile table: keyed by (experts per GPU, F, dtype, tokens), filled from a sweep's JSON."""

from __future__ import annotations

import json

import pytest

from grokserve.model.kernels import tuning
from grokserve.model.kernels.tuning import HOPPER_CONFIGS, MoeTileConfig, TileKey, pick_config

DEPLOYED = MoeTileConfig(32, 128, 64, 8, 3, 64, 128, 4, 4, group_m=16)
DECODE = MoeTileConfig(16, 32, 256, 4, 3, 32, 128, 4, 4, group_m=1)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A sweep's file for the 8 × 4096 bf16 slice at 8 and 1024 tokens, loaded into a fresh table."""
    monkeypatch.setattr(tuning, "MEASURED_CONFIGS", {})
    entries = [
        tuning.table_entry(TileKey(8, 4096, "bf16", 8), DECODE, measured_ms=0.1),
        tuning.table_entry(TileKey(8, 4096, "bf16", 1024), DEPLOYED, measured_ms=0.5),
    ]
    path = tmp_path / "moe_tiles.json"
    path.write_text(json.dumps(entries))
    return tuning.load_tile_table(path)


def test_kernels_tuning_picks_the_measured_entry_of_the_stack_and_token_bucket(measured):
    assert len(measured) == 2
    assert pick_config(1, 8, 4096, "bf16") == DECODE
    assert pick_config(8, 8, 4096, "bf16") == DECODE
    assert pick_config(9, 8, 4096, "bf16") == DEPLOYED
    assert pick_config(16384, 8, 4096, "bf16") == DEPLOYED  # beyond the largest bucket


def test_kernels_tuning_falls_back_to_the_token_table_for_other_stacks(measured):
    assert pick_config(1024, 8, 4096, "int8") == HOPPER_CONFIGS[1024]
    assert pick_config(1024, 8, 32768, "bf16") == HOPPER_CONFIGS[1024]
    assert pick_config(1024, 1, 4096, "bf16") == HOPPER_CONFIGS[1024]
    assert pick_config(1024) == HOPPER_CONFIGS[1024]


def test_kernels_tuning_refuses_an_entry_naming_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "MEASURED_CONFIGS", {})
    bad = tuning.table_entry(TileKey(8, 4096, "bf16", 8), DECODE)
    bad["config"]["block_mm"] = 16
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match=r"entry 0: unknown config fields \['block_mm'\]"):
        tuning.load_tile_table(path)
    path.write_text(json.dumps([{"experts": 8, "config": {}}]))
    with pytest.raises(ValueError, match="entry 0 needs"):
        tuning.load_tile_table(path)
