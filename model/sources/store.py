"""What every object store offers the cache: a listing pinned to versions, and ranged reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from grokserve.model.sources.location import Location


@dataclass(frozen=True)
class ObjectInfo:
    """One stored file. `name` is relative to the location's prefix (posix), `key` its full name in
    the store; `version` pins ranged
    reads to this content (S3 ETag, GCS generation, Hub commit); `checksum` is (algorithm, hex) of
    the whole object as listed, where the store gives one (see Checksum)."""

    name: str
    key: str
    size: int
    version: str
    checksum: tuple[str, str] | None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "key": self.key,
            "size": self.size,
            "version": self.version,
            "checksum": list(self.checksum) if self.checksum else None,
        }

    @classmethod
    def from_json(cls, data: dict) -> ObjectInfo:
        checksum = data.get("checksum")
        return cls(
            data["name"],
            data["key"],
            data["size"],
            data["version"],
            tuple(checksum) if checksum else None,
        )


@dataclass(frozen=True)
class Checksum:
    """What a whole object digests to: `algorithm` (md5, crc32c, sha256, git-sha1) over its bytes,
    or `multipart-etag`: S3's ETag of a multipart upload, the md5 of its parts' md5s followed by
    `-PARTS`, for parts of `part_sizes` bytes."""

    algorithm: str
    hex: str
    part_sizes: tuple[int, ...] = ()


def listed_checksum(info: ObjectInfo) -> Checksum | None:
    """The checksum the listing gave (for stores whose listing says all there is to check)."""
    return Checksum(*info.checksum) if info.checksum else None


class Store(Protocol):
    location: Location

    def list(self) -> list[ObjectInfo]:
        """Every object under the location (a single object when the location names one);
        raises SourceError (StoreUnreachable when the store does not answer)."""

    def read(self, info: ObjectInfo, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of `info`, refused by the store if the object changed since listing."""

    def checksum(self, info: ObjectInfo) -> Checksum | None:
        """What a fetched copy of `info` must digest to (None: its size alone is checked); asked
        once all its bytes are here."""


def relative_name(key: str, prefix: str) -> str | None:
    """`key` relative to `prefix` when it lies under it (or is it: a single-object location)."""
    if not prefix:
        return key
    if key == prefix:
        return key.rsplit("/", 1)[-1]
    if key.startswith(prefix + "/"):
        return key[len(prefix) + 1 :]
    return None


def open_store(location: Location) -> Store:
    """The client for a remote location; each is imported only when its scheme is used."""
    if location.scheme == "s3":
        from grokserve.model.sources.s3 import S3Store

        return S3Store(location)
    if location.scheme == "gs":
        from grokserve.model.sources.gcs import GCSStore

        return GCSStore(location)
    from grokserve.model.sources.hub import HubStore

    return HubStore(location)
