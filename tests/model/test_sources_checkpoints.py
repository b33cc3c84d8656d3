"""Every checkpoint format the suite writes, read from moto's S3 server: `grokserve inspect` and
`generate` on s3:// URLs, and rank-sliced fetches that hold exactly each rank's slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grokserve.cli import main
from grokserve.model.checkpoint import open_checkpoint
from grokserve.model.parallel import shard_tensors
from grokserve.model.placement import Cluster, Parallelism, make_plan
from grokserve.model.sources import fetch, rank_experts, rank_slicer
from testkit.checkpoints import TWELVE_LAYERS, Checkpoints, write_all
from testkit.stores import HubStandIn, files_of, moto_s3, upload_s3

FORMATS = ("xai", "hf-model", "hf-transformer-sharded", "grokserve", "grokserve-int8")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    checkpoints = write_all(tmp_path_factory.mktemp("checkpoints"))
    with moto_s3():
        for fmt in FORMATS:
            upload_s3(checkpoints.paths[fmt], "weights", fmt)
        yield checkpoints


def summary(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    out.pop("path")
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_reads_a_remote_checkpoint_as_a_local_one(
    store: Checkpoints, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = summary(["inspect", str(store.paths[fmt]), "--json", "--tensors"], capsys)
    remote = ["inspect", f"s3://weights/{fmt}", "--json", "--tensors", "--cache-dir", str(tmp_path)]
    assert summary(remote, capsys) == local


def test_generate_from_s3_prints_what_the_local_checkpoint_prints(
    store: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--prompt", "5 17 9", "--max-tokens", "8"]
    assert main([*args, "--checkpoint", str(store.paths["grokserve"])]) == 0
    local = capsys.readouterr().out
    remote = ["--checkpoint", "s3://weights/grokserve", "--cache-dir", str(tmp_path)]
    assert main([*args, *remote]) == 0
    assert capsys.readouterr().out == local
    assert main([*args, "--checkpoint", "s3://weights/absent", "--cache-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "grokserve generate: s3://weights/absent: no objects under this prefix"
    )


EXPERT_PARALLEL = make_plan(
    TWELVE_LAYERS,
    Parallelism(tensor=1, expert=4),
    Cluster(nodes=4, gpus_per_node=1, gpu_memory=10**9),
    "float32",
    None,
)


def values(tensors) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in tensors:
        parts = (value.weight, value.scales) if hasattr(value, "scales") else (value,)
        for index, part in enumerate(parts):
            out[f"{name}.{index}"] = part
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_rank_fetches_only_its_share_and_reads_its_exact_slices(
    store: Checkpoints, fmt: str, tmp_path: Path
) -> None:
    local = open_checkpoint(store.paths[fmt])
    url, shares = f"s3://weights/{fmt}", []
    for rank in range(4):
        node_cache = tmp_path / f"node{rank}"  # one node per rank: nothing shared
        slicer = rank_slicer(rank_experts(EXPERT_PARALLEL, rank))
        fetched = fetch(url, node_cache, slicer=slicer)
        read = values(shard_tensors(open_checkpoint(fetched.path), EXPERT_PARALLEL, rank))
        expected = values(shard_tensors(local, EXPERT_PARALLEL, rank))
        assert sorted(read) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(read[name], tensor), f"{fmt} rank {rank} {name}"
        shares.append(fetched.fetched_bytes / fetched.total_bytes)
    if fmt == "xai":  # one pickle per parameter, every expert in each: taken whole
        assert shares == [1.0] * 4
    else:  # everything but the three quarters of the experts' bytes that other ranks hold
        experts = sum(local.info(n).nbytes for n in local.names() if ".moe.w_" in n)
        total = fetched.total_bytes
        assert shares == [pytest.approx(1 - 0.75 * experts / total, rel=1e-9)] * 4


def test_ranks_sharing_a_node_fetch_each_range_once_and_complete_the_file(
    store: Checkpoints, tmp_path: Path
) -> None:
    fetched = [
        fetch("s3://weights/grokserve", tmp_path, rank_slicer(rank_experts(EXPERT_PARALLEL, r)))
        for r in range(4)
    ]
    assert sum(f.fetched_bytes for f in fetched) == fetched[0].total_bytes
    assert fetched[-1].path.name == "complete"  # the last rank's ranges completed every file
    assert (fetched[-1].path / "model.safetensors").read_bytes() == (
        store.paths["grokserve"] / "model.safetensors"
    ).read_bytes()


def test_the_released_layout_reads_from_the_hub_as_hf_xai_org_grok_1(
    store: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = summary(["inspect", str(store.paths["xai"]), "--json"], capsys)
    with HubStandIn("xai-org/grok-1", files_of(store.paths["xai"])):
        remote = ["inspect", "hf://xai-org/grok-1", "--json", "--cache-dir", str(tmp_path)]
        assert summary(remote, capsys) == local
