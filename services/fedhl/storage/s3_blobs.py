"""S3-compatible blob store (AWS S3, MinIO, moto): the blob with key `k` is the object
`<prefix>/objects/<k>` in one bucket.

S3 objects cannot be appended to, so resumable uploads stage on local disk (a `FileBlobStore`
staging area) and reach the bucket only once their hash is verified. Resuming an upload
therefore needs the coordinator host, and staging directory, that received its first bytes:
fine for a single coordinator or sticky sessions; elsewhere the staged size reads 0 and the
client is told to start again from offset 0.

Configured by `S3BlobStore.from_url("s3://bucket/prefix", s3=settings.s3)` (`fedhl.settings.S3Settings`:
FEDHL_S3_ENDPOINT_URL for MinIO or moto, unset for AWS; AWS_REGION, default us-east-1; without
`s3`, the same variables are read through `S3Settings.from_env`), and the usual boto3 credential
chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role).
The credentials need s3:ListBucket as well as Get/PutObject: without it, S3 answers a HEAD on a
missing key with 403 instead of 404, and a missing blob would read as an access error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

try:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("s3:// blob stores need boto3 (pip install boto3)") from e

from ..settings import S3Settings
from .blobs import _KEY_RE, BlobNotFound, FileBlobStore, check_key, check_range

# S3's bucket naming rules (also MinIO's); checked early so a typo fails with a clear message.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MISSING_KEY_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_HASH_CHUNK = 1 << 20
# Consecutive broken response streams, without progress, that `read_chunks` resumes from.
_STREAM_RETRIES = 3


class BucketNotFound(RuntimeError):
    """The configured bucket does not exist. The store never creates buckets on its own
    (`S3BlobStore.ensure_bucket` is for tests and local development)."""


class S3BlobStore:
    """`BlobStore` on an S3 bucket, with staging for resumable uploads under `staging_dir`.

    Writes are idempotent (a HEAD first skips content that is already there), and S3 PUTs are
    atomic, so a key never names a partial object. Files must not change while `put_file` runs:
    they are hashed, then uploaded.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any | None = None,
        staging_dir: Path | None = None,
        check_bucket: bool = True,
        s3: S3Settings | None = None,
    ) -> None:
        s3 = s3 if s3 is not None else S3Settings.from_env()
        if not isinstance(bucket, str) or _BUCKET_RE.fullmatch(bucket) is None:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client: Any = client if client is not None else client_for(s3)
        if check_bucket:
            self.check_bucket()  # before creating local directories for a store that cannot work
        root = Path(staging_dir) if staging_dir is not None else _default_staging_dir(bucket, self.prefix, s3)
        self._local = FileBlobStore(root)  # only its staging area and tmp/ are used
        self._tmp = root / "tmp"
        # Multipart above 16 MiB; parts stream from the file, so memory stays at a few buffers.
        self._transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)

    @classmethod
    def from_url(cls, url: str, *, staging_dir: Path | None = None, s3: S3Settings | None = None) -> S3BlobStore:
        """`s3://bucket[/prefix]`; endpoint, region and (unless given) the staging directory from
        `s3` (default: the environment), credentials from boto3's chain. The bucket must exist."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"S3 blob URL must be s3://bucket[/prefix], got {url!r}")
        return cls(parts.netloc, unquote(parts.path), staging_dir=staging_dir, s3=s3)

    @property
    def staging_dir(self) -> Path:
        return self._local.root

    def check_bucket(self) -> None:
        """Raise `BucketNotFound` (or `PermissionError`) unless the bucket is usable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _error_code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise self._bucket_not_found() from None
            if _error_code(e) in ("403", "AccessDenied", "Forbidden"):
                raise PermissionError(
                    f"access to S3 bucket {self.bucket!r} at {self._endpoint()} denied; check the credentials"
                ) from None
            raise

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (tests, local MinIO). Production buckets are
        provisioned outside the platform."""
        region = self.client.meta.region_name
        # us-east-1 is the one region that rejects an explicit LocationConstraint.
        location = {} if region in (None, "us-east-1") else {"LocationConstraint": region}
        try:
            if location:
                self.client.create_bucket(Bucket=self.bucket, CreateBucketConfiguration=location)
            else:
                self.client.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _error_code(e) != "BucketAlreadyOwnedByYou":
                raise

    # -- content store ------------------------------------------------------------------

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data)
        key = digest.hexdigest()
        if not self.exists(key):
            # S3 checks the body against this digest: a transfer error cannot land under the key.
            checksum = base64.b64encode(digest.digest()).decode()
            self._call(key, self.client.put_object, Key=self._object_key(key), Body=data, ChecksumSHA256=checksum)
        return key

    def put_file(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        key = digest.hexdigest()
        if not self.exists(key):
            self._upload(Path(path), key)
        return key

    def get_bytes(self, key: str) -> bytes:
        resp = self._call(key, self.client.get_object, Key=self._object_key(key))
        with contextlib.closing(resp["Body"]) as body:
            return bytes(body.read())

    def read_chunks(self, key: str, offset: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        size = check_range(self, key, offset, chunk_size)
        # Checked eagerly above; the GET starts on first iteration, so an unconsumed iterator
        # holds no connection.
        return self._iter_range(key, offset, size, chunk_size)

    def size(self, key: str) -> int:
        return int(self._call(key, self.client.head_object, Key=self._object_key(key))["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """Downloads the blob to a temporary file, deleted when the block exits."""
        obj = self._object_key(key)
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".download")
        os.close(fd)
        path = Path(name)
        try:
            self._call(key, self.client.download_file, Key=obj, Filename=name, Config=self._transfer)
            yield path
        finally:
            path.unlink(missing_ok=True)

    # -- resumable uploads (staged locally) ---------------------------------------------

    def staging_size(self, upload_id: str) -> int:
        return self._local.staging_size(upload_id)

    def staging_append(self, upload_id: str, offset: int, chunks: Iterable[bytes], max_size: int) -> int:
        return self._local.staging_append(upload_id, offset, chunks, max_size)

    def staging_commit(
        self, upload_id: str, expected_sha256: str, validate: Callable[[Path], None] | None = None
    ) -> str:
        # The upload runs under the staging lock, after the hash check and `validate`; if it
        # fails, the staged bytes stay and the commit can be retried.
        return self._local.commit_staged(upload_id, expected_sha256, validate, self._store_staged)

    def staging_discard(self, upload_id: str) -> None:
        self._local.staging_discard(upload_id)

    # -- lifecycle ----------------------------------------------------------------------

    def list_objects(self) -> Iterator[tuple[str, float]]:
        root = self._object_key("0" * 64)[:-64]
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root):
            for obj in page.get("Contents", []):
                key = obj["Key"][len(root) :]
                if _KEY_RE.fullmatch(key):
                    yield key, obj["LastModified"].timestamp()

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Key=self._object_key(key))

    def list_staging(self) -> Iterator[tuple[str, float]]:
        return self._local.list_staging()

    # -- internals ----------------------------------------------------------------------

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/objects/{key}" if self.prefix else f"objects/{key}"

    def _store_staged(self, path: Path, key: str) -> None:
        if not self.exists(key):
            self._upload(path, key)
        path.unlink()

    def _upload(self, path: Path, key: str) -> None:
        # upload_file, not upload_fileobj: from a file name, s3transfer streams each part from
        # disk, while from a file object it buffers whole parts in memory.
        self._call(key, self.client.upload_file, Filename=str(path), Key=self._object_key(key), Config=self._transfer)

    def _iter_range(self, key: str, offset: int, size: int, chunk_size: int) -> Iterator[bytes]:
        pos, failures = offset, 0
        while pos < size:  # never an empty Range (offset == size): S3 answers those with 416
            resp = self._call(key, self.client.get_object, Key=self._object_key(key), Range=f"bytes={pos}-{size - 1}")
            start = pos
            try:
                for chunk in resp["Body"].iter_chunks(chunk_size):
                    pos += len(chunk)
                    yield chunk
            except (HTTPClientError, IncompleteReadError):
                # A slow consumer can outlive the connection: resume with a GET from `pos`.
                failures = 1 if pos > start else failures + 1
                if failures > _STREAM_RETRIES:
                    raise
                continue
            finally:
                resp["Body"].close()
            if pos < size:  # botocore checks Content-Length, so this means a misbehaving server
                raise OSError(f"S3 object for blob {key} ended at byte {pos} of {size}")

    def _call(self, key: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        """`method(Bucket=..., **kwargs)` with S3's not-found errors mapped to ours."""
        try:
            return method(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            self._raise_mapped(e, key)

    def _raise_mapped(self, e: ClientError, key: str) -> NoReturn:
        code = _error_code(e)
        if code in _MISSING_KEY_CODES:
            raise BlobNotFound(key) from None
        if code == "NoSuchBucket":
            raise self._bucket_not_found() from None
        raise e

    def _bucket_not_found(self) -> BucketNotFound:
        return BucketNotFound(
            f"S3 bucket {self.bucket!r} does not exist at {self._endpoint()}; create it first "
            "(the blob store never creates buckets)"
        )

    def _endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def client_from_env() -> Any:
    return client_for(S3Settings.from_env())


def client_for(s3: S3Settings) -> Any:
    endpoint = s3.endpoint_url
    options: dict[str, Any] = {
        "region_name": s3.region,
        "retries": {"mode": "standard", "max_attempts": 5},
        # Each streaming download holds a connection while the agent reads it.
        "max_pool_connections": 32,
    }
    if endpoint is not None:
        options["s3"] = {"addressing_style": "path"}  # MinIO and moto serve no bucket subdomains
    # boto3 sessions are not thread-safe, so each store builds its own; its client is.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(**options))


def _default_staging_dir(bucket: str, prefix: str, s3: S3Settings) -> Path:
    base = s3.staging_dir or os.path.join(tempfile.gettempdir(), "fedhl-staging")
    # One directory per bucket and prefix: upload ids are unique only within one store.
    tag = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:12]
    return Path(base) / f"{bucket}-{tag}"
