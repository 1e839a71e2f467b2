"""A storage site in an S3-compatible object store (SeaweedFS, MinIO, Ceph RGW, AWS S3, ...).

URL: ``s3://BUCKET/PREFIX?endpoint=http://HOST:PORT&region=R`` with optional query parameters
``access_key``/``secret_key`` (else boto3's usual chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ~/.aws), ``retention_days`` and ``lock_mode`` (GOVERNANCE or COMPLIANCE: every
object is written with an Object Lock retention, for buckets created with Object Lock), and
``timeout`` (seconds, default 10) and ``multipart_mb`` (default 8, at least 5: larger objects go
up as a multipart upload in parts of this size).

Layout under the prefix mirrors the filesystem site:
    .pacsgrid-site              sentinel (an empty or foreign bucket is never taken for ours)
    .quarantine/<time>/<key>    copies that failed a fixity check, kept as evidence
    <study>/<series>/<sop>.dcm

Contract details:
- a PUT carries Content-MD5 and x-amz-checksum-sha256, so the server refuses bytes damaged on
  the way (BadDigest) and the object is durable when the PUT returns;
- no-clobber is a conditional PUT (``If-None-Match: *``): the server answers 412 when the key
  exists, the same rule as `link()` on a filesystem, without any lock;
- on a versioned or Object Lock bucket nothing is ever destroyed: quarantine copies the object
  aside and puts a delete marker on the key, so the damaged version stays retrievable; and
  `recover_version` makes an older good version of a key current again (by writing its verified
  bytes as the newest version), for an object whose every copy went bad;
- an object larger than ``multipart_mb`` goes up as a multipart upload, each part with its
  Content-MD5 and SHA-256, completed with ``If-None-Match: *`` (no-clobber as above); parts are
  invisible until the upload completes, and an upload that fails is aborted, so no partial
  object is ever visible under a key;
- `get` returns the whole object, as `StorageSite.get` promises: its caller checks the SHA-256
  before a byte is sent on. The body is read into one buffer of the object's size (one copy
  in memory, never two); a body shorter than its Content-Length (the connection broke
  mid-read) is an error, never a short object;
- connection failures, unknown buckets and refused credentials are `SiteUnavailable`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

import boto3
import botocore.exceptions as bexc
from botocore.config import Config
from urllib3.exceptions import HTTPError as URLLib3Error

from pacsgrid.errors import ConfigError, ObjectMissing, SiteUnavailable, StorageError
from pacsgrid.settings import SiteSettings, masked
from pacsgrid.storage.base import SENTINEL, ObjectInfo, PutResult, SiteHealth

log = logging.getLogger("pacsgrid.storage.s3")

QUARANTINE = ".quarantine"
_MAX_VERSIONS = 100  # versions of one key looked through for a good one
_MB = 1024 * 1024
_MIN_PART_MB = 5  # S3's smallest part (but the last)
_UNAVAILABLE_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
}
_NETWORK = (
    bexc.EndpointConnectionError,
    bexc.ConnectTimeoutError,
    bexc.ReadTimeoutError,
    bexc.ConnectionClosedError,
    bexc.NoCredentialsError,
)


class S3Site:
    def __init__(
        self,
        name: str,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        retention_days: int = 0,
        lock_mode: str = "GOVERNANCE",
        timeout: float = 10.0,
        multipart_mb: float = 8.0,
        location: str = "default",
        role: str = "archive",
        url: str = "",
    ) -> None:
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = location
        self.role = role
        self.url = url or f"s3://{bucket}/{self.prefix}"
        self.retention_days = retention_days
        self.lock_mode = lock_mode
        self.endpoint = endpoint
        self.part_size = int(multipart_mb * _MB)
        session = boto3.session.Session(
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            region_name=region or "us-east-1",
        )
        self._s3: Any = session.client(
            "s3",
            endpoint_url=endpoint or None,
            config=Config(
                connect_timeout=timeout,
                read_timeout=max(timeout, 30.0),
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=32,
                s3={"addressing_style": "path"},
            ),
        )

    @classmethod
    def from_settings(cls, s: SiteSettings) -> S3Site:
        key = f"sites.{s.name}.url"
        u = urlparse(s.url)
        if not u.netloc:
            raise ConfigError(
                key, f"expected s3://BUCKET/PREFIX?endpoint=URL, got {masked(s.url)!r}"
            )
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        known = {
            "endpoint",
            "region",
            "access_key",
            "secret_key",
            "retention_days",
            "lock_mode",
            "timeout",
            "multipart_mb",
        }
        for k in q:
            if k not in known:
                raise ConfigError(
                    key, f"unknown parameter {k!r} (known: {', '.join(sorted(known))})"
                )
        try:
            retention = int(q.get("retention_days", "0"))
            timeout = float(q.get("timeout", "10"))
            multipart_mb = float(q.get("multipart_mb", "8"))
        except ValueError:
            raise ConfigError(
                key, "retention_days, timeout and multipart_mb must be numbers"
            ) from None
        if multipart_mb < _MIN_PART_MB:
            raise ConfigError(key, f"multipart_mb must be at least {_MIN_PART_MB} (S3's part size)")
        mode = q.get("lock_mode", "GOVERNANCE").upper()
        if mode not in ("GOVERNANCE", "COMPLIANCE"):
            raise ConfigError(key, f"lock_mode must be GOVERNANCE or COMPLIANCE, got {mode!r}")
        return cls(
            s.name,
            u.netloc,
            u.path,
            endpoint=q.get("endpoint"),
            region=q.get("region"),
            access_key=q.get("access_key"),
            secret_key=q.get("secret_key"),
            retention_days=retention,
            lock_mode=mode,
            timeout=timeout,
            multipart_mb=multipart_mb,
            location=s.location,
            role=s.role,
            url=masked(s.url),
        )

    # ------------------------------------------------------------------ errors
    def _error(self, e: Exception, what: str) -> StorageError:
        if isinstance(e, _NETWORK):
            return SiteUnavailable(
                self.name,
                f"{what}: {e}",
                hint=f"is the S3 endpoint {self.endpoint or 'AWS'} reachable?",
            )
        if isinstance(e, bexc.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _UNAVAILABLE_CODES:
                return SiteUnavailable(
                    self.name,
                    f"{what}: {code}",
                    hint=f"check bucket {self.bucket!r} exists and the credentials may use it",
                )
            msg = e.response.get("Error", {}).get("Message", "")
            return StorageError(self.name, f"{what}: {code} {msg}".strip())
        if isinstance(e, bexc.BotoCoreError):
            return SiteUnavailable(self.name, f"{what}: {e}")
        return StorageError(self.name, f"{what}: {e}")

    @staticmethod
    def _code(e: bexc.ClientError) -> str:
        return str(e.response.get("Error", {}).get("Code", ""))

    def _k(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/") or key.startswith("."):
            raise StorageError(self.name, f"refusing unsafe key {key!r}")
        return self.prefix + key

    # ------------------------------------------------------------------ lifecycle
    def initialize(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            if self._exists(self.prefix + SENTINEL):
                return
            page = self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=20)
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self.prefix) :]
                if not rel.startswith("."):
                    raise SiteUnavailable(
                        self.name,
                        f"s3://{self.bucket}/{self.prefix} holds objects but no {SENTINEL}",
                        hint="use an empty prefix or one pacsgrid initialised",
                    )
            body = json.dumps(
                {"site": self.name, "created": time.time(), "host": socket.gethostname()}
            ).encode()
            self._put(self.prefix + SENTINEL, body, conditional=False)
        except StorageError:
            raise
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            err = self._error(e, "initialise")
            raise SiteUnavailable(self.name, str(err), hint="") from e

    def check(self) -> SiteHealth:
        try:
            if not self._exists(self.prefix + SENTINEL):
                return SiteHealth(
                    False,
                    f"{SENTINEL} missing in s3://{self.bucket}/{self.prefix} (wrong bucket or "
                    f"prefix, or wiped? 'pacsgrid sites init {self.name}' adopts an empty one)",
                )
        except StorageError as e:
            return SiteHealth(False, str(e))
        return SiteHealth(True)

    def describe(self) -> dict[str, str]:
        """Versioning and Object Lock state of the bucket (for `pacsgrid sites`)."""
        out: dict[str, str] = {}
        try:
            out["versioning"] = self._s3.get_bucket_versioning(Bucket=self.bucket).get(
                "Status", "off"
            )
        except (bexc.BotoCoreError, bexc.ClientError):
            out["versioning"] = "unknown"
        try:
            cfg = self._s3.get_object_lock_configuration(Bucket=self.bucket)
            out["object_lock"] = cfg["ObjectLockConfiguration"].get("ObjectLockEnabled", "off")
        except (bexc.BotoCoreError, bexc.ClientError):
            out["object_lock"] = "off"
        return out

    # ------------------------------------------------------------------ objects
    def _exists(self, full_key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=full_key)
            return True
        except bexc.ClientError as e:
            if self._code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(e, f"head {full_key}") from e
        except bexc.BotoCoreError as e:
            raise self._error(e, f"head {full_key}") from e

    def _lock_args(self) -> dict[str, Any]:
        if self.retention_days <= 0:
            return {}
        return {
            "ObjectLockMode": self.lock_mode,
            "ObjectLockRetainUntilDate": dt.datetime.now(dt.UTC)
            + dt.timedelta(days=self.retention_days),
        }

    @staticmethod
    def _digests(body: bytes | memoryview) -> dict[str, str]:
        return {
            "ContentMD5": base64.b64encode(hashlib.md5(body).digest()).decode(),
            "ChecksumSHA256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
        }

    def _put(self, full_key: str, body: bytes, *, conditional: bool) -> bool:
        """PUT with checksums; False when `conditional` and the key exists."""
        if len(body) > self.part_size:
            return self._put_multipart(full_key, [body], conditional=conditional)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full_key,
            "Body": body,
            "ContentType": "application/dicom",
            **self._digests(body),
            **self._lock_args(),
        }
        if conditional:
            args["IfNoneMatch"] = "*"
        try:
            self._s3.put_object(**args)
            return True
        except bexc.ClientError as e:
            if conditional and self._code(e) in ("PreconditionFailed", "412"):
                return False
            raise

    def _put_multipart(self, full_key: str, chunks: Sequence[bytes], *, conditional: bool) -> bool:
        """A multipart upload of the concatenation of `chunks` in parts of `part_size`, each
        checked by the server; completed with If-None-Match when `conditional`. Aborted when
        anything fails (or the key exists), so that no part outlives it."""
        upload = self._s3.create_multipart_upload(
            Bucket=self.bucket,
            Key=full_key,
            ContentType="application/dicom",
            ChecksumAlgorithm="SHA256",
            **self._lock_args(),
        )["UploadId"]
        try:
            parts = []
            for n, part in enumerate(_parts(chunks, self.part_size), 1):
                r = self._s3.upload_part(
                    Bucket=self.bucket,
                    Key=full_key,
                    UploadId=upload,
                    PartNumber=n,
                    Body=part,
                    **self._digests(part),
                )
                parts.append(
                    {"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]}
                )
            extra = {"IfNoneMatch": "*"} if conditional else {}
            self._s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
                **extra,
            )
            return True
        except bexc.ClientError as e:
            self._abort(full_key, upload)
            if conditional and self._code(e) in ("PreconditionFailed", "412"):
                return False
            raise
        except BaseException:
            self._abort(full_key, upload)
            raise

    def _abort(self, full_key: str, upload: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload)
        except (bexc.BotoCoreError, bexc.ClientError) as e:  # the server drops it later
            log.warning("%s: could not abort the upload of %s: %s", self.name, full_key, e)

    def put(
        self,
        key: str,
        chunks: Sequence[bytes],
        *,
        replace: bool = False,
        hold: bool = False,
        sha256: str = "",
        note: str = "",
    ) -> PutResult:
        # Durable when the PUT is answered: nothing to hold.
        full = self._k(key)
        try:
            if sum(len(c) for c in chunks) > self.part_size:
                # Never joined (a large dataset is a view of its spill file): part by part.
                return PutResult(self._put_multipart(full, chunks, conditional=not replace))
            return PutResult(self._put(full, b"".join(chunks), conditional=not replace))
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise self._error(e, f"write {key}") from e

    def get(self, key: str) -> bytes:
        full = self._k(key)
        try:
            resp = self._s3.get_object(Bucket=self.bucket, Key=full)
            return self._read_body(resp, key)
        except bexc.ClientError as e:
            if self._code(e) in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissing(self.name, f"no object {key}") from None
            raise self._error(e, f"read {key}") from e
        except bexc.BotoCoreError as e:
            raise self._error(e, f"read {key}") from e
        except (URLLib3Error, OSError) as e:  # the connection broke while the body streamed
            raise StorageError(self.name, f"read {key}: {e}") from e

    def _read_body(self, resp: dict[str, Any], key: str) -> bytes:
        """The whole body as one buffer of Content-Length bytes (urllib3 reads it straight
        into one bytes object: reading in chunks would only add a copy); a short body is an
        error."""
        size = int(resp["ContentLength"])
        body = resp["Body"]
        try:
            data = bytes(body.read())
        finally:
            body.close()
        if len(data) != size:
            raise StorageError(self.name, f"read {key}: {len(data)} of {size} bytes")
        return data

    def stat(self, key: str) -> ObjectInfo | None:
        full = self._k(key)
        try:
            h = self._s3.head_object(Bucket=self.bucket, Key=full)
        except bexc.ClientError as e:
            if self._code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(e, f"stat {key}") from e
        except bexc.BotoCoreError as e:
            raise self._error(e, f"stat {key}") from e
        return ObjectInfo(key, int(h["ContentLength"]), h["LastModified"].timestamp())

    def list(self, prefix: str = "", *, suffix: str = ".dcm") -> Iterator[ObjectInfo]:
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) :]
                    if not rel.endswith(suffix) or any(
                        part.startswith(".") for part in rel.split("/")
                    ):
                        continue
                    yield ObjectInfo(rel, int(obj["Size"]), obj["LastModified"].timestamp())
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise self._error(e, f"list {prefix or '/'}") from e

    def delete(self, key: str) -> None:
        if self.role != "cache":
            raise StorageError(self.name, f"refusing to delete {key}: archive sites never delete")
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._k(key))
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise self._error(e, f"delete {key}") from e

    def purge(self, key: str) -> None:
        # On a versioned bucket the object's versions stay (a delete marker hides them):
        # Object Lock decides how long, as for every other object.
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._k(key))
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise self._error(e, f"purge {key}") from e

    def recover_version(self, key: str, sha256: str, size: int) -> str | None:
        """Make the newest version of `key` whose bytes hash to `sha256` current again; its
        version id, or None when the bucket keeps no such version (not versioned, or every
        version is bad). The good bytes are written as a new version (never a server-side copy:
        what is written is what was just verified); nothing is removed."""
        full = self._k(key)
        try:
            listing = self._s3.list_object_versions(
                Bucket=self.bucket, Prefix=full, MaxKeys=_MAX_VERSIONS
            )
            # Newest first (S3 lists a key's versions so); other keys share the prefix.
            versions = [v for v in listing.get("Versions", []) if v["Key"] == full]
            for v in versions:
                if int(v.get("Size", -1)) != size:
                    continue
                vid = v["VersionId"]
                resp = self._s3.get_object(Bucket=self.bucket, Key=full, VersionId=vid)
                data = self._read_body(resp, key)
                if hashlib.sha256(data).hexdigest() == sha256:
                    self._put(full, data, conditional=False)
                    return str(vid)
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise self._error(e, f"recover {key} from its versions") from e
        return None

    def quarantine(self, key: str, reason: str) -> str:
        full = self._k(key)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        base = f"{QUARANTINE}/{stamp}/{key}"
        try:
            dest = base
            n = 0
            while self._exists(self.prefix + dest):  # never overwrite earlier evidence
                n += 1
                dest = f"{base}.{n}"
            try:
                self._s3.copy_object(
                    Bucket=self.bucket,
                    Key=self.prefix + dest,
                    CopySource={"Bucket": self.bucket, "Key": full},
                )
            except bexc.ClientError as e:
                if self._code(e) in ("NoSuchKey", "404", "NotFound"):
                    raise ObjectMissing(self.name, f"no object {key}") from None
                raise
            self._put(
                self.prefix + dest + ".reason.txt", (reason + "\n").encode(), conditional=False
            )
            # On a versioned bucket this only adds a delete marker: the bad version stays.
            self._s3.delete_object(Bucket=self.bucket, Key=full)
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise self._error(e, f"quarantine {key}") from e
        return dest


def _parts(chunks: Sequence[bytes], size: int) -> Iterator[bytes]:
    """The concatenation of `chunks` in pieces of `size` bytes (the last one shorter), each
    copied on its own: the whole is never joined in memory."""
    pending: list[memoryview] = []
    have = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while len(view):
            take = view[: size - have]
            pending.append(take)
            have += len(take)
            view = view[len(take) :]
            if have == size:
                yield b"".join(pending)
                pending, have = [], 0
    if pending:
        yield b"".join(pending)
