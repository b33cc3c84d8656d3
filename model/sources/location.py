"""Where a checkpoint is: a local path, or an object store prefix named by a URL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from grokserve.model.sources.errors import SourceError

Scheme = Literal["file", "s3", "gs", "hf"]
REMOTE_SCHEMES: tuple[Scheme, ...] = ("s3", "gs", "hf")
ACCEPTED = "a path, file://PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or hf://ORG/REPO[@REVISION][/SUBDIR]"


@dataclass(frozen=True)
class Location:
    """`container` is the bucket (s3, gs) or ORG/REPO (hf); `prefix` a folder inside it ('' for
    the root); `revision` a branch, tag or commit (hf only); `path` the directory (file only)."""

    url: str
    scheme: Scheme
    container: str = ""
    prefix: str = ""
    revision: str | None = None
    path: Path | None = None

    @property
    def is_remote(self) -> bool:
        return self.scheme in REMOTE_SCHEMES

    @property
    def cache_key(self) -> str:
        """A relative folder name unique to this location (the revision is part of it)."""
        parts = [self.scheme, self.container]
        if self.revision is not None:
            parts.append(f"@{self.revision}")
        if self.prefix:
            parts.append(self.prefix)
        return "/".join(part.replace("/", "--") for part in parts)


def parse_location(url: str) -> Location:
    """Parses a checkpoint or tokenizer location; refuses a scheme it does not know, naming it."""
    if "://" not in url:
        return Location(url, "file", path=Path(url))
    scheme, rest = url.split("://", 1)
    if scheme == "file":
        return Location(url, "file", path=Path(rest))
    if scheme == "pvc":
        raise SourceError(
            f"{url}: pvc:// names a Kubernetes PersistentVolumeClaim, which the operator mounts into "
            "the Ray pods; outside a cluster pass the mounted directory as a path"
        )
    if scheme not in REMOTE_SCHEMES:
        raise SourceError(f"{url}: unknown scheme {scheme}://; expected {ACCEPTED}")
    if scheme == "hf":
        return parse_hub(url, rest)
    container, _, prefix = rest.partition("/")
    if not container:
        raise SourceError(f"{url}: no bucket; expected {scheme}://BUCKET/PREFIX")
    return Location(url, scheme, container, clean_prefix(url, prefix))


def parse_hub(url: str, rest: str) -> Location:
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SourceError(f"{url}: expected hf://ORG/REPO[@REVISION][/SUBDIR]")
    org, repo_and_revision, *subdir = parts
    repo, _, revision = repo_and_revision.partition("@")
    if "@" in repo_and_revision and not revision:
        raise SourceError(f"{url}: empty revision after '@'")
    return Location(
        url, "hf", f"{org}/{repo}", clean_prefix(url, "/".join(subdir)), revision or "main"
    )


def clean_prefix(url: str, prefix: str) -> str:
    path = PurePosixPath(prefix)
    if ".." in path.parts:
        raise SourceError(f"{url}: '..' is not allowed in an object store prefix")
    return str(path).strip("/") if prefix.strip("/") else ""
