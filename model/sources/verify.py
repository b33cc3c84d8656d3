"""Whole-file checks against the store's size and checksum before a file is published."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Protocol

from grokserve.model.sources.errors import SourceError
from grokserve.model.sources.store import Checksum, ObjectInfo

BLOCK = 1 << 22


class Digest(Protocol):
    """What hashlib's hashes and google_crc32c's Checksum share."""

    def update(self, data: bytes, /) -> object: ...

    def digest(self) -> bytes: ...


def new_digest(algorithm: str) -> Digest:
    if algorithm == "crc32c":
        import google_crc32c

        return google_crc32c.Checksum()
    return hashlib.new("sha1" if algorithm == "git-sha1" else algorithm)


def feed(digest: Digest, file: BinaryIO, length: int | None = None) -> None:
    """`length` bytes of `file` (all that is left when None) into `digest`."""
    left = length
    while left is None or left > 0:
        block = file.read(BLOCK if left is None else min(BLOCK, left))
        if not block:
            return
        digest.update(block)
        if left is not None:
            left -= len(block)


def digest(path: Path, checksum: Checksum, size: int) -> str:
    """`path`'s digest in the form the store gives `checksum` (hex; a multipart ETag with -PARTS)."""
    with open(path, "rb") as file:
        if checksum.algorithm == "multipart-etag":
            parts = []
            for part_size in checksum.part_sizes:
                part = hashlib.md5()
                feed(part, file, part_size)
                parts.append(part.digest())
            return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"
        whole = new_digest(checksum.algorithm)
        if checksum.algorithm == "git-sha1":  # git's blob id: sha1 of "blob SIZE\0" + content
            whole.update(b"blob %d\0" % size)
        feed(whole, file)
        return whole.digest().hex()


def verify(path: Path, info: ObjectInfo, checksum: Checksum | None, source: str) -> None:
    """Raises SourceError naming the source and file unless `path` has `info`'s size and
    `checksum`."""
    size = path.stat().st_size
    if size != info.size:
        raise SourceError(
            f"{source} ({info.name}): fetched {size} bytes but the store lists {info.size}"
        )
    if checksum is None:
        return
    actual = digest(path, checksum, size)
    if actual != checksum.hex.lower():
        raise SourceError(
            f"{source} ({info.name}): {checksum.algorithm} checksum mismatch (store "
            f"{checksum.hex}, fetched {actual}); the corrupt copy was discarded, run again to fetch "
            "it anew"
        )
