"""Whole-file checks against the store's size and checksum before a file is published."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from grokserve.model.sources.errors import SourceError
from grokserve.model.sources.store import ObjectInfo

BLOCK = 1 << 22


class Digest(Protocol):
    """What hashlib's hashes and google_crc32c's Checksum share."""

    def update(self, data: bytes, /) -> object: ...

    def digest(self) -> bytes: ...


def digest(path: Path, algorithm: str, size: int) -> str:
    crc: Digest
    if algorithm == "crc32c":
        import google_crc32c

        crc = google_crc32c.Checksum()
        update = crc.update
    else:
        crc = hashlib.new("sha1" if algorithm == "git-sha1" else algorithm)
        update = crc.update
        if algorithm == "git-sha1":  # git's blob id: sha1 of "blob SIZE\0" + content
            update(b"blob %d\0" % size)
    with open(path, "rb") as file:
        while block := file.read(BLOCK):
            update(block)
    return crc.digest().hex()


def verify(path: Path, info: ObjectInfo, source: str) -> None:
    """Raises SourceError naming the source and file unless `path` matches `info`."""
    size = path.stat().st_size
    if size != info.size:
        raise SourceError(
            f"{source} ({info.name}): fetched {size} bytes but the store lists {info.size}"
        )
    if info.checksum is None:
        return
    algorithm, expected = info.checksum
    actual = digest(path, algorithm, size)
    if actual != expected.lower():
        raise SourceError(
            f"{source} ({info.name}): {algorithm} checksum mismatch (store {expected}, fetched "
            f"{actual}); the corrupt copy was discarded, run again to fetch it anew"
        )
