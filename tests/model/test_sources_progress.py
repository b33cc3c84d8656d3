"""A fetch tells its caller how much of its share is on disk while the bytes arrive (what a replica
reports as Loading progress), from the first report to the last, cold and warm."""

from __future__ import annotations

from pathlib import Path

from grokserve.model.sources import fetch, rank_experts, rank_slicer
from grokserve.model.sources.cache import NodeCache
from grokserve.model.sources.location import parse_location
from grokserve.model.sources.s3 import S3Store
from grokserve.serving.config import ServingConfig
from grokserve.serving.loading import DEMO_CHECKPOINT, model_config
from testkit.stores import moto_s3, upload_s3

URL = "s3://weights/demo"


def test_progress_grows_chunk_by_chunk_to_the_share_and_a_warm_cache_starts_complete(
    tmp_path: Path,
) -> None:
    reports: list[tuple[int, int]] = []
    with moto_s3():
        upload_s3(DEMO_CHECKPOINT, "weights", "demo")
        location = parse_location(URL)
        # Small chunks: the 5 MB demo arrives in many steps, as a large checkpoint does.
        cache = NodeCache(tmp_path, location, chunk_bytes=256 << 10, parallel=2)
        cold = cache.fetch(S3Store(location), on_progress=lambda *report: reports.append(report))
        warm: list[tuple[int, int]] = []
        again = fetch(URL, tmp_path, on_progress=lambda *report: warm.append(report))
    share = cold.needed_bytes
    assert share == cold.total_bytes == sum(p.stat().st_size for p in DEMO_CHECKPOINT.iterdir())
    dones = [done for done, _ in reports]
    assert {needed for _, needed in reports} == {share}
    assert dones[0] == 0 and dones[-1] == share
    assert dones == sorted(dones) and len(set(dones)) > 10, dones
    # Nothing fetched on a warm start: the one report already says all of it is there.
    assert again.fetched_bytes == 0 and warm == [(share, share)]


def test_a_ranks_progress_counts_only_its_share(tmp_path: Path) -> None:
    reports: list[tuple[int, int]] = []
    with moto_s3():
        upload_s3(DEMO_CHECKPOINT, "weights", "demo")
        config = ServingConfig(
            model={"source": URL, "cacheDir": str(tmp_path)},
            parallelism={"gpusPerNode": 4, "tensor": 1, "expert": 4},
        )
        plan = config.plan(model_config(config.model))
        slicer = rank_slicer(rank_experts(plan, 1))
        fetched = fetch(URL, tmp_path, slicer, on_progress=lambda *report: reports.append(report))
    assert reports[-1] == (fetched.needed_bytes, fetched.needed_bytes)
    assert fetched.needed_bytes < fetched.total_bytes
