"""Checkpoint sources against real stores on 127.0.0.1: moto's S3 server, fake-gcs-server and the
Hub stand-in; the node cache's verify-then-publish, resume, offline and error paths."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import boto3
import httpx
import pytest

from grokserve.cli import main
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
from testkit.stores import (
    GCSAuthStandIn,
    HubStandIn,
    fake_gcs,
    files_of,
    moto_s3,
    rsa_key,
    upload_gcs,
    upload_s3,
)


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


def test_whole_files_not_yet_published_serve_offline(s3_demo, tmp_path: Path, monkeypatch) -> None:
    # Killed after each file's last byte and before its verification: all of it is in partial/.
    monkeypatch.setattr(NodeCache, "publish", lambda self, partial, checksum: None)
    fetch("s3://weights/demo", tmp_path)
    monkeypatch.undo()
    s3_demo.stop()  # S3 is asked for a multipart upload's part sizes: offline, nothing is published
    offline = fetch("s3://weights/demo", tmp_path)
    assert offline.fetched_bytes == 0
    assert files_of(offline.path) == files_of(DEMO_CHECKPOINT)
    assert complete_files(tmp_path) == []


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


PARALLEL_FETCH = """
import json, sys, threading, time
from pathlib import Path
from grokserve.model.sources.cache import NodeCache
from grokserve.model.sources.location import parse_location
from grokserve.model.sources.s3 import S3Store

url, cache, rank, marks = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
other = "1" if rank == "0" else "0"
read, overlapped, lock = {}, [], threading.Lock()

def wait_for(mark, seconds):
    deadline = time.monotonic() + seconds
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.01)

class Recording(S3Store):
    def read(self, info, start, stop):
        # Ordering evidence: a rank's first requests wait (20 s at most) until the other rank has
        # a request in flight too; under one lock for the whole fetch they never would.
        (marks / rank).touch()
        if not overlapped:
            wait_for(marks / other, 20)
        with lock:
            overlapped.append((marks / other).exists())
        data = super().read(info, start, stop)
        with lock:
            read[info.name] = read.get(info.name, 0) + len(data)
        return data

def share(info, _read):
    return [(0, info.size)] if info.name in ("shared.bin", f"only{rank}.bin") else []

location = parse_location(url)
(marks / f"ready{rank}").touch()  # both ranks start fetching together, however slow to start
wait_for(marks / f"ready{other}", 120)
fetched = NodeCache(cache, location, chunk_bytes=1 << 16).fetch(Recording(location), share)
print(json.dumps({"read": read, "overlapped": overlapped[0], "path": str(fetched.path),
                  "fetched": fetched.fetched_bytes}))
"""


def test_ranks_of_a_node_fetch_different_files_at_once_and_shared_files_once(
    s3_demo, tmp_path: Path
) -> None:
    rng = random.Random(0)
    files = {"shared.bin": 1 << 20, "only0.bin": 1 << 18, "only1.bin": 1 << 18}
    store = tmp_path / "store"
    store.mkdir()
    for name, size in files.items():
        (store / name).write_bytes(rng.randbytes(size))
    upload_s3(store, "weights", "ranks")
    cache, marks = tmp_path / "cache", tmp_path / "marks"
    marks.mkdir()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", PARALLEL_FETCH, "s3://weights/ranks", cache, str(rank), marks],
            env={**os.environ, "PYTHONSAFEPATH": "1"},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    reports = [json.loads(rank.communicate(timeout=120)[0]) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    # Both ranks had a request in flight at once: each fetched its own file beside the other.
    assert [report["overlapped"] for report in reports] == [True, True]
    for rank, report in enumerate(reports):
        assert report["read"].get(f"only{rank}.bin") == files[f"only{rank}.bin"]
        assert f"only{1 - rank}.bin" not in report["read"]
        assert report["fetched"] == sum(report["read"].values())
        view = Path(report["path"])
        for name in ("shared.bin", f"only{rank}.bin"):
            assert (view / name).read_bytes() == (store / name).read_bytes()
    # The shared file was fetched once on the node: the other rank waited and took it verified.
    assert sum(report["read"].get("shared.bin", 0) for report in reports) == files["shared.bin"]
    assert "shared.bin" in complete_files(cache)


def multipart_upload(path: Path, key: str, part_sizes: list[int]) -> str:
    """Uploads `path` to s3://weights/KEY in parts of `part_sizes` bytes; returns the ETag."""
    client = boto3.client("s3")
    data = path.read_bytes()
    upload = client.create_multipart_upload(Bucket="weights", Key=key)["UploadId"]
    parts, offset = [], 0
    for number, size in enumerate(part_sizes, 1):
        etag = client.upload_part(
            Bucket="weights",
            Key=key,
            UploadId=upload,
            PartNumber=number,
            Body=data[offset : offset + size],
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
        offset += size
    assert offset == len(data)
    client.complete_multipart_upload(
        Bucket="weights", Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )
    return client.head_object(Bucket="weights", Key=key)["ETag"].strip('"')


@pytest.mark.parametrize(
    "part_sizes",
    [[5 << 20, 5 << 20, 1 << 20], [6 << 20, 5 << 20, 3000]],
    ids=["equal-parts", "unequal-parts"],
)
def test_multipart_uploads_are_verified_by_their_etag(
    s3_demo, tmp_path: Path, monkeypatch, part_sizes: list[int]
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(1).randbytes(sum(part_sizes)))
    etag = multipart_upload(big, "multipart/big.bin", part_sizes)
    assert etag.endswith("-3")
    fetched = fetch("s3://weights/multipart", tmp_path / "good")
    assert fetched.path.joinpath("big.bin").read_bytes() == big.read_bytes()

    honest = S3Store.read

    def corrupt(self, info, start, stop):  # one bit of the last part: the size stays right
        data = honest(self, info, start, stop)
        return data[:-1] + bytes([data[-1] ^ 1]) if stop == info.size else data

    monkeypatch.setattr(S3Store, "read", corrupt)
    with pytest.raises(SourceError) as error:
        fetch("s3://weights/multipart", tmp_path / "bad")
    assert re.fullmatch(
        rf"s3://weights/multipart \(big\.bin\): multipart-etag checksum mismatch \(store {etag}, "
        r"fetched [0-9a-f]{32}-3\); the corrupt copy was discarded, run again to fetch it anew",
        str(error.value),
    )
    assert complete_files(tmp_path / "bad") == []


def test_gs_with_real_credentials_and_wrong_ones(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_gcs() as emulator:
        upload_gcs(DEMO_CHECKPOINT, "weights", "demo")
        with GCSAuthStandIn(emulator.url) as google:
            key = google.service_account(tmp_path / "key.json")
            monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
            fetched = fetch("gs://weights/demo", tmp_path / "cache")  # with the issued token
            assert files_of(fetched.path) == files_of(DEMO_CHECKPOINT)

            wrong = google.service_account(tmp_path / "wrong.json", rsa_key()[0])
            monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(wrong))
            inspect = ["inspect", "gs://weights/demo", "--cache-dir", str(tmp_path / "other")]
            assert main(inspect) == 1
            assert capsys.readouterr().err.splitlines() == [
                "grokserve inspect: gs://weights/demo: Google refused the credentials "
                "(invalid_grant: Invalid JWT Signature.); check GOOGLE_APPLICATION_CREDENTIALS or "
                "the pods' Workload Identity"
            ]

            monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
            google.revoked = True  # a token the API no longer accepts
            assert main(inspect) == 1
            assert capsys.readouterr().err.splitlines() == [
                "grokserve inspect: gs://weights/demo: access denied: wrong credentials, or they "
                "lack storage.objects.get/list"
            ]
            google.stop()  # neither the token endpoint nor the API answers: the cache serves
            assert fetch("gs://weights/demo", tmp_path / "cache").path == fetched.path


def test_sse_kms_objects_are_checked_by_size_alone(s3_demo, tmp_path: Path, monkeypatch) -> None:
    # On AWS an SSE-KMS object's ETag is no MD5 of its bytes (moto's is): checking it would refuse
    # every such file, so a copy of the right size is taken, whatever its bytes.
    boto3.client("s3").put_object(
        Bucket="weights", Key="kms/config.json", Body=b"{}" * 50, ServerSideEncryption="aws:kms"
    )
    honest = S3Store.read
    monkeypatch.setattr(S3Store, "read", lambda *args: honest(*args).replace(b"{", b"["))
    fetched = fetch("s3://weights/kms/config.json", tmp_path)
    assert fetched.path.read_bytes() == b"[}" * 50
