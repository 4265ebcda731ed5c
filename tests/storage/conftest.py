"""Backends for the shared storage suites: every interface test runs against each of them.

The Redis backends need a real server (CI has one): FEDHL_TEST_REDIS_URL, default
redis://127.0.0.1:6379/0. Each test gets its own random key prefix and its keys are deleted
afterwards. An unreachable server fails the tests rather than skipping them, so a CI job
without Redis cannot pass by testing nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fedhl.storage.blobs import BlobStore, FileBlobStore
from fedhl.storage.coordination import Coordination, open_coordination

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("FEDHL_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(
            f"Redis at {url} is unreachable ({e}). The coordination suite runs against a real "
            "Redis: start one (redis-server --port 6379 --save '' --appendonly no) or point "
            "FEDHL_TEST_REDIS_URL at one.",
            pytrace=False,
        )
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    prefix = f"fedhl-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["inprocess", "redis"])
def coordination(request: pytest.FixtureRequest) -> Iterator[Coordination]:
    if request.param == "inprocess":
        coord = open_coordination(None)
    else:
        url = request.getfixturevalue("redis_url")
        coord = open_coordination(url, prefix=request.getfixturevalue("redis_prefix"))
    try:
        yield coord
    finally:
        coord.close()


@pytest.fixture(params=["file"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    # One entry per backend; S3 joins here when it exists.
    return FileBlobStore(tmp_path / "blobs")
