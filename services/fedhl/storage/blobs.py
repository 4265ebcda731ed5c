"""Content-addressed blob store: bytes keyed by the sha256 hex digest of their content.

Payloads are safetensors files, but the store is byte-level and never parses them. Resumable
uploads land in an append-only staging area and enter the content store only once their hash
is verified, so a key always names exactly the bytes that hash to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from ..settings import S3Settings

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_COPY_CHUNK = 1 << 20


class BlobNotFound(KeyError):
    """No blob (or no staged upload) under that key."""


class BlobIntegrityError(ValueError):
    """Staged bytes do not hash to the expected sha256; the staged data was discarded."""


class BlobTooLarge(ValueError):
    """An upload would exceed its size limit."""


class OffsetMismatch(ValueError):
    """An append's offset is not the staged size (a resume from the wrong place, or a concurrent
    stream moved it); `expected` is where the upload must continue."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


class UploadInProgress(RuntimeError):
    """Another call is writing, committing or discarding this upload id right now."""


class BlobStore(Protocol):
    """Immutable blobs keyed by sha256 hex, plus a staging area for resumable uploads."""

    def put_bytes(self, data: bytes) -> str:
        """Store `data`; return its key. Storing the same bytes again is a no-op."""
        ...

    def put_file(self, path: Path) -> str:
        """Store a file's content, hashing while copying (never whole-file in memory)."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def read_chunks(self, key: str, offset: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Chunks of at most `chunk_size` bytes from `offset` to the end. Raises
        `BlobNotFound` at call time, not on first iteration."""
        ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def local_path(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """A local file holding the blob (for `safetensors.safe_open`), valid inside the
        `with` block. Treat it as read-only."""
        ...

    def staging_size(self, upload_id: str) -> int:
        """Bytes staged so far under `upload_id`; 0 if none."""
        ...

    def staging_append(self, upload_id: str, offset: int, chunks: Iterable[bytes], max_size: int) -> int:
        """Append `chunks` at `offset`, which must equal the staged size (else `OffsetMismatch`
        naming the expected offset). Data is fsynced before returning, and also when the
        iterator raises midway, so a dropped stream resumes from the new `staging_size`.
        Raises `BlobTooLarge`, keeping only what was staged before this call, if the total
        would exceed `max_size`. Returns the new staged size."""
        ...

    def staging_commit(
        self, upload_id: str, expected_sha256: str, validate: Callable[[Path], None] | None = None
    ) -> str:
        """Verify the staged bytes hash to `expected_sha256` and move them atomically into the
        content store; return the key. On mismatch the staged data is discarded and
        `BlobIntegrityError` raised. `validate(path)` runs on the verified staged file before it
        is stored; if it raises, the staged data is discarded and the error propagates."""
        ...

    def staging_discard(self, upload_id: str) -> None: ...

    def list_objects(self) -> Iterator[tuple[str, float]]:
        """Every stored key with its write time (unix seconds), for garbage collection."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is ignored."""
        ...

    def list_staging(self) -> Iterator[tuple[str, float]]:
        """Every staged (unfinished) upload id with the time of its last write."""
        ...


def check_range(store: BlobStore, key: str, offset: int, chunk_size: int) -> int:
    """The blob's size, after checking a read from `offset` in `chunk_size` pieces makes sense."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    size = store.size(key)
    if not 0 <= offset <= size:
        raise ValueError(f"offset {offset} outside blob {key} of {size} bytes")
    return size


def check_key(key: str) -> str:
    """`key` if it is a sha256 hex digest (64 lowercase hex), else `ValueError`. Keys become
    file names, so nothing else may pass (no path traversal)."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"invalid blob key {key!r}: expected 64 lowercase hex characters")
    return key


def check_upload_id(upload_id: str) -> str:
    if not isinstance(upload_id, str) or _UPLOAD_ID_RE.fullmatch(upload_id) is None:
        raise ValueError(f"invalid upload id {upload_id!r}: expected [A-Za-z0-9_-]{{1,128}}")
    return upload_id


class FileBlobStore:
    """Blobs as files: `root/objects/ab/cdef…` (sha256 hex, two-character fan-out),
    `root/staging/<upload_id>`, and `root/tmp/` for writes in flight.

    Every object is written to `tmp/` and `os.replace`d under its key, so a crash never
    leaves a partial object under a key; `tmp/` is on the same filesystem as `objects/`,
    which keeps the rename atomic. Staging files are guarded by `flock`, which also excludes
    other processes sharing the root (coordinator replicas on one volume).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._staging = self.root / "staging"
        self._tmp = self.root / "tmp"
        for d in (self._objects, self._staging, self._tmp):
            d.mkdir(parents=True, exist_ok=True)

    # -- content store ------------------------------------------------------------------

    def put_bytes(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        if not self._present(key):
            with self._temp_file() as (fd, tmp):
                _write_all(fd, data)
                os.fsync(fd)
                self._install(tmp, key)
        return key

    def put_file(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as src, self._temp_file() as (fd, tmp):
            while chunk := src.read(_COPY_CHUNK):
                digest.update(chunk)
                _write_all(fd, chunk)
            os.fsync(fd)
            key = digest.hexdigest()
            if not self._present(key):
                self._install(tmp, key)
        return key

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._object_path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def read_chunks(self, key: str, offset: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        check_range(self, key, offset, chunk_size)
        # Checked eagerly above; the file is opened lazily so an unconsumed iterator holds no fd.
        return _iter_file(self._object_path(key), offset, chunk_size)

    def size(self, key: str) -> int:
        try:
            return self._object_path(key).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._object_path(key).is_file()

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._object_path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        yield path

    # -- resumable uploads --------------------------------------------------------------

    def staging_size(self, upload_id: str) -> int:
        try:
            return self._staging_path(upload_id).stat().st_size
        except FileNotFoundError:
            return 0

    def staging_append(self, upload_id: str, offset: int, chunks: Iterable[bytes], max_size: int) -> int:
        check_upload_id(upload_id)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        # Only a fresh upload (offset 0) creates the staging file.
        with self._locked_staging(upload_id, create=offset == 0) as fd:
            size = 0 if fd is None else os.fstat(fd).st_size
            if fd is None or offset != size:
                raise OffsetMismatch(
                    f"upload {upload_id}: offset {offset} does not match the staged size; expected offset {size}", size
                )
            end = size
            try:
                if end > max_size:
                    raise BlobTooLarge(f"upload {upload_id}: {end} bytes exceed {max_size}")
                os.lseek(fd, size, os.SEEK_SET)
                for chunk in chunks:
                    if end + len(chunk) > max_size:
                        # Roll back this call only: the client may retry with a smaller payload.
                        os.ftruncate(fd, size)
                        raise BlobTooLarge(f"upload {upload_id}: more than {max_size} bytes (limit)")
                    _write_all(fd, chunk)
                    end += len(chunk)
            finally:
                # Also on a dropped stream: what arrived is durable and the client resumes there.
                os.fsync(fd)
            return end

    def staging_commit(
        self, upload_id: str, expected_sha256: str, validate: Callable[[Path], None] | None = None
    ) -> str:
        return self.commit_staged(upload_id, expected_sha256, validate, self._store_staged)

    def commit_staged(
        self,
        upload_id: str,
        expected_sha256: str,
        validate: Callable[[Path], None] | None,
        store: Callable[[Path, str], None],
    ) -> str:
        """`staging_commit` with a pluggable last step, so other backends reuse this staging area:
        after the hash check and `validate`, still under the upload's lock, `store(path, key)` must
        take the staged file away (rename it, or upload and unlink it). If `store` raises, the
        staged bytes stay as they were and the commit can be retried."""
        check_upload_id(upload_id)
        key = check_key(expected_sha256)
        path = self._staging_path(upload_id)
        with self._locked_staging(upload_id, create=False) as fd:
            if fd is None:
                raise BlobNotFound(f"no staged upload {upload_id}")
            digest = hashlib.sha256()
            pos = 0
            while chunk := os.pread(fd, _COPY_CHUNK, pos):
                digest.update(chunk)
                pos += len(chunk)
            if digest.hexdigest() != key:
                os.unlink(path)
                raise BlobIntegrityError(
                    f"upload {upload_id}: sha256 {digest.hexdigest()} != expected {key}; staged data discarded"
                )
            if validate is not None:
                try:
                    validate(path)  # under the lock: nobody appends while we read
                except Exception:
                    os.unlink(path)
                    raise
            store(path, key)
            _fsync_dir(self._staging)
        return key

    def staging_discard(self, upload_id: str) -> None:
        check_upload_id(upload_id)
        with self._locked_staging(upload_id, create=False) as fd:
            if fd is not None:
                os.unlink(self._staging_path(upload_id))

    # -- lifecycle ----------------------------------------------------------------------

    def list_objects(self) -> Iterator[tuple[str, float]]:
        for fan in sorted(self._objects.iterdir()):
            for f in sorted(fan.iterdir()):
                key = fan.name + f.name
                if _KEY_RE.fullmatch(key):
                    with contextlib.suppress(FileNotFoundError):
                        yield key, f.stat().st_mtime

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._object_path(key))

    def list_staging(self) -> Iterator[tuple[str, float]]:
        for f in sorted(self._staging.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                yield f.name, f.stat().st_mtime

    # -- internals ----------------------------------------------------------------------

    def _object_path(self, key: str) -> Path:
        check_key(key)
        return self._objects / key[:2] / key[2:]

    def _staging_path(self, upload_id: str) -> Path:
        return self._staging / check_upload_id(upload_id)

    def _store_staged(self, path: Path, key: str) -> None:
        if self._present(key):
            os.unlink(path)  # already stored (identical bytes): nothing to move
        else:
            self._install(path, key)

    def _present(self, key: str) -> bool:
        """Whether `key` is stored; if so its write time is refreshed, so that content written
        again (deduplicated) gets the garbage collector's full grace period for its new reference."""
        try:
            os.utime(self._object_path(key))
            return True
        except FileNotFoundError:
            return False

    def _install(self, src: Path, key: str) -> None:
        """Atomically rename `src` (same filesystem) to the object path of `key`."""
        dest = self._object_path(key)
        if not dest.parent.is_dir():
            dest.parent.mkdir(exist_ok=True)
            _fsync_dir(self._objects)
        os.replace(src, dest)
        _fsync_dir(dest.parent)

    @contextlib.contextmanager
    def _temp_file(self) -> Iterator[tuple[int, Path]]:
        """A new file in `tmp/`, removed on exit unless it was renamed away."""
        path = self._tmp / f"{secrets.token_hex(16)}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            yield fd, path
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @contextlib.contextmanager
    def _locked_staging(self, upload_id: str, create: bool) -> Iterator[int | None]:
        """The staging file's descriptor under an exclusive `flock`, or None if there is no
        staging file. Raises `UploadInProgress` if another call holds the lock."""
        path = self._staging_path(upload_id)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        for _ in range(3):
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                yield None
                return
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UploadInProgress(f"upload {upload_id} is busy") from None
                # A commit or discard may have renamed or unlinked the file between our open
                # and our lock: then this descriptor no longer names the staging file, and
                # writing through it could corrupt a committed object.
                try:
                    current = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    yield fd
                    return
            finally:
                os.close(fd)  # also releases the flock
        raise UploadInProgress(f"upload {upload_id} keeps changing under us")


def resolve_blob_url(url: str) -> str:
    """`file://./x` → an absolute file URL, so every process agrees on the directory."""
    if url.startswith("file://"):
        return "file://" + str(Path(url[len("file://") :]).resolve())
    return url


def open_blob_store(url: str, s3: S3Settings | None = None) -> BlobStore:
    """A blob store from `file:///abs/path`, a plain filesystem path, or `s3://bucket/prefix`
    (reached as `s3` says; unset: `S3Settings.from_env()`)."""
    if _URL_RE.match(url) is None:
        return FileBlobStore(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "s3":
        # Imported here so boto3 is only needed by deployments that use S3.
        from .s3_blobs import S3BlobStore

        return S3BlobStore.from_url(url, s3=s3)
    if parts.scheme != "file":
        raise ValueError(f"unsupported blob URL scheme {parts.scheme!r} in {url!r} (use file:// or s3://)")
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ValueError(f"file blob URL must be file:///absolute/path, got {url!r}")
    return FileBlobStore(Path(unquote(parts.path)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iter_file(path: Path, offset: int, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(chunk_size):
            yield chunk
