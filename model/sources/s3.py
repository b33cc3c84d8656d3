"""s3:// through boto3: the standard AWS credential chain and variables (AWS_ENDPOINT_URL, AWS_PROFILE,
AWS_ACCESS_KEY_ID, web identity for IRSA), so MinIO, Ceph and R2 work as AWS does."""

from __future__ import annotations

import boto3
import botocore.config
import botocore.exceptions

from grokserve.model.sources.errors import SourceError, StoreUnreachable
from grokserve.model.sources.location import Location
from grokserve.model.sources.store import Checksum, ObjectInfo, relative_name

# What a store that does not read objects by part number answers HeadObject's PartNumber with.
NO_PART_NUMBERS = {"InvalidArgument", "InvalidRequest", "NotImplemented", "400", "501"}
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401"}
UNREACHABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


def encrypted(head: dict) -> bool:
    """Whether HeadObject's answer says SSE-KMS or SSE-C, under which the ETag digests nothing."""
    return head.get("ServerSideEncryption", "").startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm")
    )


class S3Store:
    def __init__(self, location: Location, connections: int = 16) -> None:
        self.location = location
        config = botocore.config.Config(
            max_pool_connections=connections,
            retries={"mode": "standard"},  # attempts: AWS_MAX_ATTEMPTS, else 3
            connect_timeout=10,
        )
        self.client = boto3.client("s3", config=config)

    def list(self) -> list[ObjectInfo]:
        bucket, prefix = self.location.container, self.location.prefix
        objects = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    name = relative_name(item["Key"], prefix)
                    if name and not name.endswith("/"):
                        etag = item["ETag"].strip('"')
                        kind = "multipart-etag" if "-" in etag else "md5"
                        objects.append(
                            ObjectInfo(name, item["Key"], item["Size"], etag, (kind, etag))
                        )
        except Exception as error:
            raise self.error(error) from error
        return objects

    def read(self, info: ObjectInfo, start: int, stop: int) -> bytes:
        try:
            response = self.client.get_object(
                Bucket=self.location.container,
                Key=info.key,
                Range=f"bytes={start}-{stop - 1}",
                IfMatch=f'"{info.version}"',
            )
            return response["Body"].read()
        except Exception as error:
            raise self.error(error, info.name) from error

    def checksum(self, info: ObjectInfo) -> Checksum | None:
        """The ETag, checked as what it is. A multipart upload's ETag is the md5 of its parts'
        md5s, so the part sizes are needed: part 1's size and the part count (HEAD with PartNumber
        1) give them when the uploader cut equal parts, as the AWS CLI, boto3, mc and rclone do;
        otherwise each part's size is asked. Under SSE-KMS or SSE-C, or from a store that does not
        answer per part, the ETag digests nothing we can check, and the size alone is."""
        if info.checksum is None:
            return None
        kind, etag = info.checksum
        if kind == "md5":
            return None if encrypted(self.head(info)) else Checksum("md5", etag)
        count = int(etag.rsplit("-", 1)[1])
        first = self.head(info, 1)
        if first.get("PartsCount") != count or encrypted(first):
            return None
        part_size = first["ContentLength"]
        last = info.size - part_size * (count - 1)
        if 0 < last <= part_size:
            return Checksum("multipart-etag", etag, (part_size,) * (count - 1) + (last,))
        answers = [self.head(info, n) for n in range(1, count + 1)]
        if not all(answers):
            return None
        return Checksum("multipart-etag", etag, tuple(a["ContentLength"] for a in answers))

    def head(self, info: ObjectInfo, part: int | None = None) -> dict:
        """HeadObject, of one part when `part` is given ({} if the store refuses part numbers)."""
        # Not pinned with If-Match: stores differ in which ETag (the part's or the object's) they
        # match it against. The bytes are pinned; a layout of a newer version fails verification.
        where = {"Bucket": self.location.container, "Key": info.key}
        try:
            return self.client.head_object(**where, **({"PartNumber": part} if part else {}))
        except Exception as error:
            refused = isinstance(error, botocore.exceptions.ClientError) and (
                error.response.get("Error", {}).get("Code") in NO_PART_NUMBERS
            )
            if part and refused:
                return {}
            raise self.error(error, info.name) from error

    def error(self, error: Exception, name: str | None = None) -> SourceError:
        where = f"{self.location.url}" + (f" ({name})" if name else "")
        if isinstance(error, UNREACHABLE):
            return StoreUnreachable(f"{where}: the S3 endpoint does not answer ({error})")
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            return SourceError(
                f"{where}: no AWS credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or give the pods a role"
            )
        if isinstance(error, botocore.exceptions.ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return SourceError(f"{where}: bucket {self.location.container!r} does not exist")
            if code in ("NoSuchKey", "404"):
                return SourceError(f"{where}: the object is missing")
            if code in DENIED:
                return SourceError(
                    f"{where}: access denied ({code}): wrong credentials, or they lack "
                    "s3:ListBucket/s3:GetObject on this bucket"
                )
            if code in ("PreconditionFailed", "412"):
                return SourceError(
                    f"{where}: the object changed while it was being fetched (ETag is no longer "
                    "the listed one); run again to fetch the new version"
                )
        return SourceError(f"{where}: {type(error).__name__}: {error}")
