"""gs:// through google-cloud-storage: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS,
Workload Identity, gcloud), and the variables the client honours itself: API_ENDPOINT_OVERRIDE (another
endpoint, with credentials) and STORAGE_EMULATOR_HOST (an emulator, without)."""

from __future__ import annotations

import base64

import google.api_core.exceptions as api_errors
import google.auth.exceptions
import requests
from google.api_core.retry import Retry, if_exception_type
from google.cloud import storage

from grokserve.model.sources.errors import SourceError, StoreUnreachable
from grokserve.model.sources.location import Location
from grokserve.model.sources.store import Checksum, ObjectInfo, listed_checksum, relative_name

# The client's default retries a refused connection for two minutes; here a store that does not
# answer fails at once (and a complete cache serves), while throttling and 5xx are retried.
RETRY = Retry(
    predicate=if_exception_type(
        api_errors.TooManyRequests,
        api_errors.InternalServerError,
        api_errors.BadGateway,
        api_errors.ServiceUnavailable,
        api_errors.GatewayTimeout,
        requests.exceptions.Timeout,
    ),
    timeout=120,
)


def hex_of(encoded: str | None) -> str | None:
    return base64.b64decode(encoded).hex() if encoded else None


class GCSStore:
    def __init__(self, location: Location) -> None:
        self.location = location
        try:
            self.client = storage.Client()
        except google.auth.exceptions.DefaultCredentialsError as error:
            raise SourceError(
                f"{location.url}: no Google credentials; set GOOGLE_APPLICATION_CREDENTIALS or "
                "run under Workload Identity"
            ) from error
        self.bucket = self.client.bucket(location.container)

    def list(self) -> list[ObjectInfo]:
        objects = []
        try:
            for blob in self.client.list_blobs(
                self.bucket, prefix=self.location.prefix, retry=RETRY
            ):
                name = relative_name(blob.name, self.location.prefix)
                if name and not name.endswith("/"):
                    if md5 := hex_of(blob.md5_hash):
                        checksum: tuple[str, str] | None = ("md5", md5)
                    elif crc := hex_of(blob.crc32c):  # composite objects have no MD5
                        checksum = ("crc32c", crc)
                    else:
                        checksum = None
                    objects.append(
                        ObjectInfo(name, blob.name, blob.size, str(blob.generation), checksum)
                    )
        except Exception as error:
            raise self.error(error) from error
        return objects

    def read(self, info: ObjectInfo, start: int, stop: int) -> bytes:
        blob = self.bucket.blob(info.key, generation=int(info.version))
        try:
            return blob.download_as_bytes(start=start, end=stop - 1, checksum=None, retry=RETRY)
        except Exception as error:
            raise self.error(error, info.name) from error

    def checksum(self, info: ObjectInfo) -> Checksum | None:
        return listed_checksum(info)

    def error(self, error: Exception, name: str | None = None) -> SourceError:
        where = self.location.url + (f" ({name})" if name else "")
        if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return StoreUnreachable(f"{where}: the GCS endpoint does not answer ({error})")
        if isinstance(error, google.auth.exceptions.RefreshError):
            # The token endpoint refused the credentials: a wrong or deleted key, a revoked grant.
            cause = error.args[0] if error.args else error
            return SourceError(
                f"{where}: Google refused the credentials ({cause}); check "
                "GOOGLE_APPLICATION_CREDENTIALS or the pods' Workload Identity"
            )
        if isinstance(error, google.auth.exceptions.TransportError):
            return StoreUnreachable(f"{where}: the Google token endpoint does not answer ({error})")
        if isinstance(error, api_errors.NotFound):
            what = "the object (or its listed generation)" if name else "the bucket"
            return SourceError(f"{where}: {what} does not exist")
        if isinstance(error, api_errors.Forbidden | api_errors.Unauthorized):
            return SourceError(
                f"{where}: access denied: wrong credentials, or they lack storage.objects.get/list"
            )
        return SourceError(f"{where}: {type(error).__name__}: {error}")
