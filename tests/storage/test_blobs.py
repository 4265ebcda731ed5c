"""Blob store suite: the shared tests take `blob_store` (every backend); the FileBlobStore
section checks its on-disk layout and crash safety, the S3BlobStore section its object
layout, configuration and recovery from S3 failures."""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from botocore.exceptions import EndpointConnectionError, ResponseStreamingError
from safetensors import safe_open
from safetensors.torch import save

from fedhl.storage.blobs import (
    BlobIntegrityError,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    FileBlobStore,
    UploadInProgress,
    open_blob_store,
)
from fedhl.storage.s3_blobs import BucketNotFound, S3BlobStore

DATA = bytes(range(256)) * 40  # 10 240 bytes
BAD_KEYS = [
    "",
    "../" + "a" * 61,
    "A" * 64,  # uppercase hex
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "a" * 64 + "\n",
    "ab/" + "c" * 61,
]
BAD_UPLOAD_IDS = ["", "../x", "a/b", "a.b", "x\n", "a" * 129, "ü"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dropped_stream(*chunks: bytes) -> Iterator[bytes]:
    """Yields `chunks`, then fails like a client that disconnected."""
    yield from chunks
    raise ConnectionError("client went away")


# -- content store ----------------------------------------------------------------------


def test_round_trip(blob_store: BlobStore) -> None:
    key = blob_store.put_bytes(DATA)

    assert blob_store.get_bytes(key) == DATA
    assert blob_store.size(key) == len(DATA)
    assert blob_store.exists(key)


def test_key_is_sha256_and_put_is_idempotent(blob_store: BlobStore) -> None:
    first = blob_store.put_bytes(DATA)
    second = blob_store.put_bytes(DATA)

    assert first == second == sha(DATA)
    assert blob_store.put_bytes(b"") == sha(b"")
    assert blob_store.get_bytes(sha(b"")) == b""


def test_put_file_matches_put_bytes(blob_store: BlobStore, tmp_path: Path) -> None:
    path = tmp_path / "payload.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several copy chunks
    path.write_bytes(data)

    key = blob_store.put_file(path)

    assert key == sha(data) == blob_store.put_bytes(data)
    assert blob_store.get_bytes(key) == data


def test_put_file_streams(blob_store: BlobStore, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(1 << 20))

    tracemalloc.start()
    try:
        blob_store.put_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 4 * (1 << 20), f"peak {peak} bytes: put_file read the 16 MiB file whole"


def test_missing_blob(blob_store: BlobStore) -> None:
    key = sha(b"never stored")

    assert not blob_store.exists(key)
    with pytest.raises(BlobNotFound):
        blob_store.get_bytes(key)
    with pytest.raises(BlobNotFound):
        blob_store.size(key)
    with pytest.raises(BlobNotFound):
        blob_store.read_chunks(key)  # at call time, before iterating
    with pytest.raises(BlobNotFound), blob_store.local_path(key):
        pass


@pytest.mark.parametrize(("offset", "chunk_size"), [(0, 1 << 20), (0, 1000), (1, 1000), (5000, 7), (10_240, 16)])
def test_read_chunks(blob_store: BlobStore, offset: int, chunk_size: int) -> None:
    key = blob_store.put_bytes(DATA)

    chunks = list(blob_store.read_chunks(key, offset=offset, chunk_size=chunk_size))

    assert b"".join(chunks) == DATA[offset:]
    assert all(0 < len(c) <= chunk_size for c in chunks)


def test_read_chunks_rejects_bad_ranges(blob_store: BlobStore) -> None:
    key = blob_store.put_bytes(DATA)

    for offset in (-1, len(DATA) + 1):
        with pytest.raises(ValueError, match="offset"):
            blob_store.read_chunks(key, offset=offset)
    with pytest.raises(ValueError, match="chunk_size"):
        blob_store.read_chunks(key, chunk_size=0)


def test_local_path_opens_with_safetensors(blob_store: BlobStore) -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # (3, 4)
    key = blob_store.put_bytes(save({"w": tensor}, metadata={"round": "3"}))

    with blob_store.local_path(key) as path, safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"round": "3"}
        assert torch.equal(f.get_tensor("w"), tensor)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(blob_store: BlobStore, key: str) -> None:
    for call in (blob_store.get_bytes, blob_store.size, blob_store.exists, blob_store.read_chunks):
        with pytest.raises(ValueError, match="invalid blob key"):
            call(key)
    with pytest.raises(ValueError, match="invalid blob key"), blob_store.local_path(key):
        pass
    blob_store.staging_append("u1", 0, [DATA], max_size=1 << 20)
    with pytest.raises(ValueError, match="invalid blob key"):
        blob_store.staging_commit("u1", key)


@pytest.mark.parametrize("upload_id", BAD_UPLOAD_IDS)
def test_bad_upload_ids_rejected(blob_store: BlobStore, upload_id: str) -> None:
    with pytest.raises(ValueError, match="invalid upload id"):
        blob_store.staging_size(upload_id)
    with pytest.raises(ValueError, match="invalid upload id"):
        blob_store.staging_append(upload_id, 0, [b"x"], max_size=10)
    with pytest.raises(ValueError, match="invalid upload id"):
        blob_store.staging_commit(upload_id, sha(b"x"))
    with pytest.raises(ValueError, match="invalid upload id"):
        blob_store.staging_discard(upload_id)


# -- resumable uploads ------------------------------------------------------------------


def test_staging_append_in_two_calls_then_commit(blob_store: BlobStore) -> None:
    assert blob_store.staging_size("up-1") == 0

    assert blob_store.staging_append("up-1", 0, [DATA[:100], DATA[100:4000]], 1 << 20) == 4000
    assert blob_store.staging_size("up-1") == 4000
    assert blob_store.staging_append("up-1", 4000, iter([DATA[4000:]]), 1 << 20) == len(DATA)
    key = blob_store.staging_commit("up-1", sha(DATA))

    assert key == sha(DATA)
    assert blob_store.get_bytes(key) == DATA
    assert blob_store.staging_size("up-1") == 0


@pytest.mark.parametrize("offset", [0, 99, 101])
def test_staging_wrong_offset_names_expected(blob_store: BlobStore, offset: int) -> None:
    blob_store.staging_append("up", 0, [DATA[:100]], 1 << 20)

    with pytest.raises(ValueError, match="expected offset 100"):
        blob_store.staging_append("up", offset, [b"x"], 1 << 20)
    assert blob_store.staging_size("up") == 100


def test_staging_resume_without_start_is_refused(blob_store: BlobStore) -> None:
    with pytest.raises(ValueError, match="expected offset 0"):
        blob_store.staging_append("fresh", 10, [b"x"], 1 << 20)
    assert blob_store.staging_size("fresh") == 0


def test_staging_oversize_keeps_earlier_data(blob_store: BlobStore) -> None:
    blob_store.staging_append("up", 0, [DATA[:60]], max_size=100)

    with pytest.raises(BlobTooLarge):
        blob_store.staging_append("up", 60, [DATA[60:90], DATA[90:120]], max_size=100)

    assert blob_store.staging_size("up") == 60  # the first 30 bytes of the failed call rolled back
    assert blob_store.staging_append("up", 60, [DATA[60:100]], max_size=100) == 100
    assert blob_store.get_bytes(blob_store.staging_commit("up", sha(DATA[:100]))) == DATA[:100]


def test_staging_dropped_stream_keeps_data(blob_store: BlobStore) -> None:
    with pytest.raises(ConnectionError):
        blob_store.staging_append("up", 0, dropped_stream(DATA[:10], DATA[10:25]), 1 << 20)

    assert blob_store.staging_size("up") == 25
    blob_store.staging_append("up", 25, [DATA[25:]], 1 << 20)
    assert blob_store.get_bytes(blob_store.staging_commit("up", sha(DATA))) == DATA


def test_staging_commit_hash_mismatch_discards(blob_store: BlobStore) -> None:
    blob_store.staging_append("up", 0, [DATA], 1 << 20)
    wrong = sha(b"something else")

    with pytest.raises(BlobIntegrityError):
        blob_store.staging_commit("up", wrong)

    assert blob_store.staging_size("up") == 0
    assert not blob_store.exists(wrong)
    assert not blob_store.exists(sha(DATA))


def test_staging_commit_of_known_content_dedups(blob_store: BlobStore) -> None:
    key = blob_store.put_bytes(DATA)
    blob_store.staging_append("up", 0, [DATA], 1 << 20)

    assert blob_store.staging_commit("up", key) == key
    assert blob_store.staging_size("up") == 0
    assert blob_store.get_bytes(key) == DATA


def test_staging_commit_or_discard_unknown(blob_store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        blob_store.staging_commit("nope", sha(b""))
    blob_store.staging_discard("nope")  # no-op


def test_staging_discard(blob_store: BlobStore) -> None:
    blob_store.staging_append("up", 0, [DATA], 1 << 20)

    blob_store.staging_discard("up")

    assert blob_store.staging_size("up") == 0
    assert blob_store.staging_append("up", 0, [b"new"], 10) == 3  # the id starts over


def test_staging_concurrent_append_refused(blob_store: BlobStore) -> None:
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_stream() -> Iterator[bytes]:
        yield b"abc"
        entered.set()
        release.wait(5)
        yield b"def"

    def upload() -> None:
        try:
            blob_store.staging_append("up", 0, slow_stream(), 100)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    worker = threading.Thread(target=upload)
    worker.start()
    try:
        assert entered.wait(5)
        with pytest.raises(UploadInProgress):
            blob_store.staging_append("up", 3, [b"x"], 100)
        with pytest.raises(UploadInProgress):
            blob_store.staging_commit("up", sha(b"abc"))
    finally:
        release.set()
        worker.join(5)

    assert not errors
    assert blob_store.staging_size("up") == 6


# -- FileBlobStore specifics ------------------------------------------------------------


@pytest.fixture
def file_store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def leftovers(store: FileBlobStore) -> list[Path]:
    return list((store.root / "tmp").iterdir())


def test_file_layout(file_store: FileBlobStore) -> None:
    key = file_store.put_bytes(DATA)
    file_store.staging_append("up-7", 0, [b"abc"], 10)

    assert (file_store.root / "objects" / key[:2] / key[2:]).read_bytes() == DATA
    assert (file_store.root / "staging" / "up-7").read_bytes() == b"abc"
    with file_store.local_path(key) as path:
        assert path == file_store.root / "objects" / key[:2] / key[2:]
    assert leftovers(file_store) == []


def test_crash_before_rename_leaves_no_object(
    file_store: FileBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    path = tmp_path / "in.bin"
    path.write_bytes(DATA[::-1])

    with pytest.raises(OSError, match="simulated"):
        file_store.put_bytes(DATA)
    with pytest.raises(OSError, match="simulated"):
        file_store.put_file(path)

    assert not file_store.exists(sha(DATA))
    assert not file_store.exists(sha(DATA[::-1]))
    assert leftovers(file_store) == []


def test_commit_is_atomic(file_store: FileBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    file_store.staging_append("up", 0, [DATA], 1 << 20)
    real_replace = os.replace

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        file_store.staging_commit("up", sha(DATA))

    # Nothing under the key, the staged bytes intact: the commit can simply be retried.
    assert not file_store.exists(sha(DATA))
    assert file_store.staging_size("up") == len(DATA)
    monkeypatch.setattr(os, "replace", real_replace)
    assert file_store.staging_commit("up", sha(DATA)) == sha(DATA)
    assert file_store.get_bytes(sha(DATA)) == DATA


def test_open_blob_store(tmp_path: Path) -> None:
    by_url = open_blob_store(f"file://{tmp_path}/a")
    by_path = open_blob_store(str(tmp_path / "b"))

    assert isinstance(by_url, FileBlobStore) and by_url.root == tmp_path / "a"
    assert isinstance(by_path, FileBlobStore) and by_path.root == tmp_path / "b"
    with pytest.raises(ValueError, match="unsupported blob URL scheme"):
        open_blob_store("gs://bucket/prefix")
    with pytest.raises(ValueError, match="absolute"):
        open_blob_store("file://host/x")


# -- S3BlobStore specifics --------------------------------------------------------------


def test_s3_layout(s3_store: S3BlobStore) -> None:
    key = s3_store.put_bytes(DATA)
    s3_store.staging_append("up-7", 0, [b"abc"], 10)

    listed = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"fedhl/blobs/objects/{key}"]
    assert (s3_store.staging_dir / "staging" / "up-7").read_bytes() == b"abc"  # staging is local
    with s3_store.local_path(key) as path:
        assert path.read_bytes() == DATA
    assert not path.exists()  # the download is deleted after the block
    assert list((s3_store.staging_dir / "tmp").iterdir()) == []


def test_s3_open_blob_store(s3_store: S3BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDHL_S3_STAGING_DIR", str(tmp_path / "staging-root"))
    key = s3_store.put_bytes(DATA)

    store = open_blob_store(f"s3://{s3_store.bucket}/fedhl/blobs/")  # endpoint and credentials from env

    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == (s3_store.bucket, "fedhl/blobs")
    assert store.staging_dir.parent == tmp_path / "staging-root"
    assert store.get_bytes(key) == DATA
    assert not open_blob_store(f"s3://{s3_store.bucket}/other").exists(key)  # prefixes are separate stores


def test_s3_missing_bucket_is_named(s3_store: S3BlobStore, tmp_path: Path) -> None:
    with pytest.raises(BucketNotFound, match="'fedhl-no-such-bucket'"):
        open_blob_store("s3://fedhl-no-such-bucket/x")
    # A bucket deleted under a running store: still named, never a missing blob.
    unchecked = S3BlobStore("fedhl-no-such-bucket", client=s3_store.client, staging_dir=tmp_path, check_bucket=False)
    with pytest.raises(BucketNotFound, match="'fedhl-no-such-bucket'"):
        unchecked.get_bytes(sha(DATA))


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://Bad_Bucket/x", "s3://bucket/x?versionId=1"])
def test_s3_bad_urls(s3_endpoint: str, url: str) -> None:
    with pytest.raises(ValueError, match="S3"):
        open_blob_store(url)


def test_s3_commit_survives_upload_failure(s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_store.staging_append("up", 0, [DATA], 1 << 20)

    def unreachable(**kwargs: Any) -> None:
        raise EndpointConnectionError(endpoint_url="http://s3.invalid")

    monkeypatch.setattr(s3_store.client, "upload_file", unreachable)
    with pytest.raises(EndpointConnectionError):
        s3_store.staging_commit("up", sha(DATA))

    # Nothing under the key, the staged bytes intact: the commit can simply be retried.
    assert not s3_store.exists(sha(DATA))
    assert s3_store.staging_size("up") == len(DATA)
    monkeypatch.undo()
    assert s3_store.staging_commit("up", sha(DATA)) == sha(DATA)
    assert s3_store.get_bytes(sha(DATA)) == DATA
    assert s3_store.staging_size("up") == 0


def break_streams(store: S3BlobStore, monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """Make the next `times` GETs' bodies fail after one chunk, like a reset connection.
    Returns the Range of every GET."""
    real_get = store.client.get_object
    ranges: list[str] = []

    def get_object(**kwargs: Any) -> Any:
        resp = real_get(**kwargs)
        ranges.append(kwargs["Range"])
        if len(ranges) <= times:
            body = resp["Body"]

            def iter_chunks(chunk_size: int) -> Iterator[bytes]:
                yield body.read(chunk_size)
                raise ResponseStreamingError(error="connection reset by peer")

            resp["Body"] = SimpleNamespace(iter_chunks=iter_chunks, close=body.close)
        return resp

    monkeypatch.setattr(store.client, "get_object", get_object)
    return ranges


def test_s3_read_chunks_resumes_dropped_streams(s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = s3_store.put_bytes(DATA)
    ranges = break_streams(s3_store, monkeypatch, times=5)  # more than the retry budget, but each makes progress

    chunks = list(s3_store.read_chunks(key, offset=1000, chunk_size=1000))

    assert b"".join(chunks) == DATA[1000:]
    assert ranges[:3] == ["bytes=1000-10239", "bytes=2000-10239", "bytes=3000-10239"]


def test_s3_read_chunks_gives_up_without_progress(s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = s3_store.put_bytes(DATA)
    real_get = s3_store.client.get_object

    def dead_stream(**kwargs: Any) -> Any:
        resp = real_get(**kwargs)
        resp["Body"].close()

        def iter_chunks(chunk_size: int) -> Iterator[bytes]:
            raise ResponseStreamingError(error="connection reset by peer")
            yield b""  # pragma: no cover - makes this a generator

        resp["Body"] = SimpleNamespace(iter_chunks=iter_chunks, close=lambda: None)
        return resp

    monkeypatch.setattr(s3_store.client, "get_object", dead_stream)
    with pytest.raises(ResponseStreamingError):
        list(s3_store.read_chunks(key))
