"""Checkpoint sources against real stores on 127.0.0.1: moto's S3 server, fake-gcs-server and the
Hub stand-in; the node cache's verify-then-publish, resume, offline and error paths."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import httpx
import pytest

from grokserve.model.checkpoint import open_checkpoint
from grokserve.model.sources import (
    SourceError,
    checkpoint_files,
    fetch,
    metadata_only,
    parse_location,
)
from grokserve.model.sources.cache import NodeCache, PartialFile
from grokserve.model.sources.ranges import merge, total
from grokserve.model.sources.s3 import S3Store
from grokserve.serving.loading import DEMO_CHECKPOINT
from testkit.stores import HubStandIn, fake_gcs, files_of, moto_s3, upload_gcs, upload_s3


def test_locations_parse_and_unknown_schemes_are_refused_by_name() -> None:
    hub = parse_location("hf://xai-org/grok-1@v1.0/ckpt")
    assert (hub.container, hub.revision, hub.prefix) == ("xai-org/grok-1", "v1.0", "ckpt")
    assert parse_location("hf://xai-org/grok-1").revision == "main"
    s3 = parse_location("s3://bucket/a/b/")
    assert (s3.container, s3.prefix) == ("bucket", "a/b")
    assert parse_location("file:///models/x").path == Path("/models/x")
    with pytest.raises(SourceError, match=r"unknown scheme ftp://"):
        parse_location("ftp://host/x")
    with pytest.raises(SourceError, match="PersistentVolumeClaim"):
        parse_location("pvc://claim/x")
    with pytest.raises(SourceError, match="ORG/REPO"):
        parse_location("hf://just-org")


@pytest.fixture
def s3_demo():
    with moto_s3() as server:
        upload_s3(DEMO_CHECKPOINT, "weights", "demo")
        yield server


def complete_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("complete/*"))


def test_s3_fetches_verified_files_once_and_serves_them_with_the_store_gone(
    s3_demo, tmp_path: Path
) -> None:
    first = fetch("s3://weights/demo", tmp_path)
    assert files_of(first.path) == files_of(DEMO_CHECKPOINT)
    assert (
        first.fetched_bytes
        == first.total_bytes
        == sum(p.stat().st_size for p in DEMO_CHECKPOINT.iterdir())
    )
    assert open_checkpoint(first.path).config == open_checkpoint(DEMO_CHECKPOINT).config
    assert fetch("s3://weights/demo", tmp_path).fetched_bytes == 0  # listed again, nothing fetched
    s3_demo.stop()
    offline = fetch("s3://weights/demo", tmp_path)
    assert offline.path == first.path and offline.fetched_bytes == 0
    with pytest.raises(SourceError, match=r"s3://weights/demo: the S3 endpoint does not answer"):
        fetch("s3://weights/demo", tmp_path / "empty")


def test_s3_single_object_and_metadata_only(s3_demo, tmp_path: Path) -> None:
    tokenizer = fetch("s3://weights/demo/tokenizer.model", tmp_path)
    assert tokenizer.path.read_bytes() == (DEMO_CHECKPOINT / "tokenizer.model").read_bytes()
    meta = fetch("s3://weights/demo", tmp_path, slicer=metadata_only)
    assert meta.fetched_bytes < meta.total_bytes / 10
    assert open_checkpoint(meta.path).config == open_checkpoint(DEMO_CHECKPOINT).config
    assert "model.safetensors" not in complete_files(tmp_path)  # a header is not a file


def test_files_no_reader_reads_are_not_fetched(s3_demo, tmp_path: Path) -> None:
    extras = tmp_path / "extras"
    extras.mkdir()
    (extras / "README.md").write_text("# the demo\n")
    (extras / "pytorch_model.bin").write_bytes(b"\0" * 100_000)
    upload_s3(extras, "weights", "demo")
    fetched = fetch("s3://weights/demo", tmp_path / "cache", slicer=checkpoint_files)
    assert fetched.fetched_bytes == fetched.total_bytes - 100_000 - len("# the demo\n")
    assert open_checkpoint(fetched.path).config == open_checkpoint(DEMO_CHECKPOINT).config


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("s3://missing/demo", "s3://missing/demo: bucket 'missing' does not exist"),
        ("s3://weights/nothing", "s3://weights/nothing: no objects under this prefix"),
    ],
)
def test_s3_bad_locations_fail_in_one_line(s3_demo, tmp_path: Path, url: str, cause: str) -> None:
    with pytest.raises(SourceError) as error:
        fetch(url, tmp_path)
    assert str(error.value) == cause


def test_wrong_s3_credentials_fail_in_one_line(s3_demo, tmp_path: Path) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    # moto checks credentials against its IAM once asked to; "testing" is no key it issued.
    httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        with pytest.raises(SourceError) as error:
            fetch("s3://weights/demo", tmp_path)
    finally:
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()
    assert str(error.value) == (
        "s3://weights/demo: access denied (InvalidAccessKeyId): wrong credentials, or they lack "
        "s3:ListBucket/s3:GetObject on this bucket"
    )


def test_an_object_replaced_during_a_fetch_is_refused(s3_demo, tmp_path, monkeypatch) -> None:
    honest = S3Store.read

    def replaced_first(self, info, start, stop):
        monkeypatch.setattr(S3Store, "read", honest)
        self.client.put_object(Bucket="weights", Key=info.key, Body=b"another version")
        return honest(self, info, start, stop)

    monkeypatch.setattr(S3Store, "read", replaced_first)
    with pytest.raises(SourceError, match=r"s3://weights/demo \(\S+\): the object changed while"):
        fetch("s3://weights/demo", tmp_path)


def test_a_checksum_mismatch_publishes_nothing(s3_demo, tmp_path: Path, monkeypatch) -> None:
    honest = S3Store.read

    def corrupt(self, info, start, stop):
        data = honest(self, info, start, stop)
        return bytes([data[0] ^ 1]) + data[1:] if info.name == "config.json" else data

    monkeypatch.setattr(S3Store, "read", corrupt)
    with pytest.raises(
        SourceError, match=r"s3://weights/demo \(config.json\): md5 checksum mismatch"
    ):
        fetch("s3://weights/demo", tmp_path)
    assert "config.json" not in complete_files(tmp_path)
    assert not list(tmp_path.rglob("partial/config.json*"))
    monkeypatch.setattr(S3Store, "read", honest)
    assert files_of(fetch("s3://weights/demo", tmp_path).path) == files_of(DEMO_CHECKPOINT)


def test_a_killed_download_resumes_where_it_stopped(s3_demo, tmp_path: Path, monkeypatch) -> None:
    location = parse_location("s3://weights/demo")
    honest, calls = S3Store.read, []

    def dies_after_three(self, info, start, stop):
        calls.append(stop - start)
        if len(calls) > 3:
            raise SourceError("s3://weights/demo: connection reset")
        return honest(self, info, start, stop)

    monkeypatch.setattr(S3Store, "read", dies_after_three)
    cache = NodeCache(tmp_path, location, chunk_bytes=1 << 20, parallel=1)
    with pytest.raises(SourceError, match="connection reset"):
        cache.fetch(S3Store(location))
    assert complete_files(tmp_path) != sorted(p.name for p in DEMO_CHECKPOINT.iterdir())
    monkeypatch.setattr(S3Store, "read", honest)
    resumed = cache.fetch(S3Store(location))
    assert resumed.fetched_bytes == resumed.total_bytes - sum(calls[:3])
    assert files_of(resumed.path) == files_of(DEMO_CHECKPOINT)


SLOW_FETCH = """
import sys, time
from pathlib import Path
from grokserve.model.sources.cache import NodeCache
from grokserve.model.sources.location import parse_location
from grokserve.model.sources.s3 import S3Store

class Slow(S3Store):
    def read(self, info, start, stop):
        time.sleep(0.05)
        return super().read(info, start, stop)

location = parse_location(sys.argv[1])
NodeCache(Path(sys.argv[2]), location, chunk_bytes=1 << 16, parallel=1).fetch(Slow(location))
"""


def test_a_fetch_killed_with_sigkill_resumes_without_refetching(s3_demo, tmp_path: Path) -> None:
    url = "s3://weights/demo"
    fetcher = subprocess.Popen(
        [sys.executable, "-c", SLOW_FETCH, url, str(tmp_path)],
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    journal = tmp_path / "s3/weights/demo/partial/model.safetensors.ranges"
    deadline = time.monotonic() + 60
    while not (journal.is_file() and len(journal.read_text().splitlines()) > 5):
        assert fetcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    fetcher.kill()
    fetcher.wait()
    partial = tmp_path / "s3/weights/demo/partial"
    held = sum(
        total(merge(tuple(map(int, line.split())) for line in j.read_text().splitlines()[1:]))
        for j in partial.glob("*.ranges")
    ) + sum(p.stat().st_size for p in tmp_path.rglob("complete/*"))
    assert held > 0
    location = parse_location(url)
    resumed = NodeCache(tmp_path, location, chunk_bytes=1 << 16).fetch(S3Store(location))
    assert resumed.fetched_bytes == resumed.total_bytes - held
    assert files_of(resumed.path) == files_of(DEMO_CHECKPOINT)


def test_a_disk_filling_up_midway_fails_naming_the_cache(
    s3_demo, tmp_path: Path, monkeypatch
) -> None:
    def full(self, start, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PartialFile, "write", full)
    with pytest.raises(SourceError, match=r"s3://weights/demo: the cache .* ran out of disk space"):
        fetch("s3://weights/demo", tmp_path)
    assert complete_files(tmp_path) == []


def test_a_full_disk_is_refused_before_fetching(s3_demo, tmp_path: Path, monkeypatch) -> None:
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(
        SourceError,
        match=r"s3://weights/demo: the cache .* needs 5,6\d\d,\d\d\d more bytes but its disk has 1,000 free",
    ):
        fetch("s3://weights/demo", tmp_path)
    assert complete_files(tmp_path) == []


def test_gs_through_the_emulator(tmp_path: Path) -> None:
    with fake_gcs():
        upload_gcs(DEMO_CHECKPOINT, "weights", "demo")
        fetched = fetch("gs://weights/demo", tmp_path)
        assert files_of(fetched.path) == files_of(DEMO_CHECKPOINT)
        with pytest.raises(SourceError, match=r"gs://nothere/demo: the bucket does not exist"):
            fetch("gs://nothere/demo", tmp_path)


def test_hf_revisions_subdirs_tokens_and_offline(tmp_path: Path, monkeypatch) -> None:
    files = {f"weights/{name}": data for name, data in files_of(DEMO_CHECKPOINT).items()}
    with HubStandIn("org/demo", files, revisions=("main", "v1"), token="secret"):
        with pytest.raises(SourceError, match=r"hf://org/demo@v1/weights: repository org/demo"):
            fetch("hf://org/demo@v1/weights", tmp_path)
        monkeypatch.setenv("HF_TOKEN", "secret")
        fetched = fetch("hf://org/demo@v1/weights", tmp_path)
        assert files_of(fetched.path) == files_of(DEMO_CHECKPOINT)
        with pytest.raises(SourceError, match=r"revision 'v2' not found in org/demo"):
            fetch("hf://org/demo@v2/weights", tmp_path)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert fetch("hf://org/demo@v1/weights", tmp_path).path == fetched.path
        with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set; the cache"):
            fetch("hf://org/demo@main/weights", tmp_path)
