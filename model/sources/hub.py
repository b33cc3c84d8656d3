"""hf:// through huggingface_hub: HF_ENDPOINT, HF_TOKEN (or the stored login) and HF_HUB_OFFLINE,
read when a source is opened. Listings are pinned to the revision's commit; files are read by range
from the same `resolve` URLs `hf_hub_download` uses."""

from __future__ import annotations

import os

from huggingface_hub import HfApi, RepoFile, constants, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from grokserve.model.sources.errors import SourceError, StoreUnreachable
from grokserve.model.sources.location import Location
from grokserve.model.sources.store import Checksum, ObjectInfo, listed_checksum, relative_name


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


class HubStore:
    def __init__(self, location: Location) -> None:
        self.location = location
        self.endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        self.token = os.environ.get("HF_TOKEN") or None
        self.api = HfApi(endpoint=self.endpoint, token=self.token)

    def list(self) -> list[ObjectInfo]:
        if offline():
            raise StoreUnreachable(f"{self.location.url}: HF_HUB_OFFLINE is set")
        repo, prefix = self.location.container, self.location.prefix
        try:
            commit = self.api.model_info(repo, revision=self.location.revision).sha
            if commit is None:  # every version of a file is pinned to the commit
                raise ValueError(f"the Hub names no commit for revision {self.location.revision!r}")
            entries = self.api.list_repo_tree(
                repo, path_in_repo=prefix or None, revision=commit, recursive=True
            )
            objects = []
            for entry in entries:
                name = relative_name(entry.path, prefix)
                if not isinstance(entry, RepoFile) or name is None:
                    continue
                lfs = entry.lfs
                checksum = ("sha256", lfs.sha256) if lfs else ("git-sha1", entry.blob_id)
                objects.append(ObjectInfo(name, entry.path, entry.size, commit, checksum))
        except Exception as error:
            raise self.error(error) from error
        return objects

    def read(self, info: ObjectInfo, start: int, stop: int) -> bytes:
        url = hf_hub_url(
            self.location.container, info.key, revision=info.version, endpoint=self.endpoint
        )
        headers = build_hf_headers(token=self.token) | {"Range": f"bytes={start}-{stop - 1}"}
        try:
            response = get_session().get(url, headers=headers, follow_redirects=True)
            hf_raise_for_status(response)
            return response.content
        except Exception as error:
            raise self.error(error, info.name) from error

    def checksum(self, info: ObjectInfo) -> Checksum | None:
        return listed_checksum(info)

    def error(self, error: Exception, name: str | None = None) -> SourceError:
        where = self.location.url + (f" ({name})" if name else "")
        repo, revision = self.location.container, self.location.revision
        if isinstance(error, RevisionNotFoundError):
            return SourceError(f"{where}: revision {revision!r} not found in {repo}")
        if isinstance(error, GatedRepoError):
            return SourceError(f"{where}: {repo} is gated; accept its terms and set HF_TOKEN")
        if isinstance(error, RepositoryNotFoundError):
            return SourceError(
                f"{where}: repository {repo} not found (or private and HF_TOKEN is wrong or unset)"
            )
        if isinstance(error, EntryNotFoundError):
            return SourceError(f"{where}: the file is missing at revision {revision!r}")
        if isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else "?"
            if status in (401, 403):
                return SourceError(f"{where}: access denied (HTTP {status}): check HF_TOKEN")
            return SourceError(f"{where}: the Hub answered HTTP {status}")
        if type(error).__module__.split(".")[0].startswith("httpx") or isinstance(error, OSError):
            return StoreUnreachable(f"{where}: {self.endpoint} does not answer ({error})")
        return SourceError(f"{where}: {type(error).__name__}: {error}")
