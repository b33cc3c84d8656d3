"""Sharded execution over 2 and 4 CPU processes (gloo) equals the single-process model.

One spawn per world size; every rank checks every case (testkit.sharding.CASES): the full forward and
prefill + 4 decode steps give the same float32 logits (≤ 1e-5), routing counts agree, the KV cache
holds only the rank's kv heads, and int8 shards equal the int8 model. In bf16 the partial sums are
rounded before they are added, so a bf16 shard is judged by its distance from the float32 model: no
worse than the single-process bf16 model's, within 50 %.
"""

from pathlib import Path

import pytest

from testkit.sharding import CASES, run_world

TOLERANCE = 1e-5


@pytest.mark.parametrize("world", sorted(CASES))
def test_every_rank_reproduces_the_single_process_logits(world: int, tmp_path: Path) -> None:
    ranks = run_world(world, tmp_path)
    for rank, results in enumerate(ranks):
        assert set(results) == set(CASES[world])
        for name, got in results.items():
            _, _, tensor, expert, weights = CASES[world][name]
            where = f"{name} rank {rank}"
            if weights == "bfloat16":
                assert got["full_error"] <= 1.5 * got["single_full_error"], where
            else:
                assert got["full"] <= TOLERANCE, where
                assert got["decode"] <= TOLERANCE, where
                assert got["counts_equal"], where
            assert got["cache_heads"] == 4 // tensor, where  # grok-tiny has 4 kv heads
            assert got["state_dict_matches"], where
            assert len(got["experts"]) == 8 // expert, where
