"""Backends for the shared storage suites: every interface test runs against each of them.

The Redis backends need a real server (CI has one): FEDHL_TEST_REDIS_URL, default
redis://127.0.0.1:6379/0. Each test gets its own random key prefix and its keys are deleted
afterwards. An unreachable server fails the tests rather than skipping them, so a CI job
without Redis cannot pass by testing nothing.

The S3 blob store runs against a real moto server process (one per session, on a free local
port, dummy credentials through the environment), with a fresh bucket per test. A server that
does not start fails the tests, for the same reason.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dbunit import sessions, unit_database
from fedhl.storage.blobs import BlobStore, FileBlobStore
from fedhl.storage.coordination import Coordination, open_coordination
from fedhl.storage.s3_blobs import S3BlobStore, client_from_env

__all__ = ["sessions", "unit_database"]  # migrated-database fixture for the repository tests

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


MOTO_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _start_moto(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A moto server answering on 127.0.0.1; a few tries, since the free port can be taken
    between probing it and the server binding it."""
    for _ in range(3):
        port = _free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(port):
                return proc, port
            time.sleep(0.05)
        _stop(proc)
    pytest.fail(
        f"the moto S3 server did not start (pip install 'moto[server]'); its output:\n{log.read_text()}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server's URL; while it runs, the environment configures S3 clients for it."""
    proc, port = _start_moto(tmp_path_factory.mktemp("moto") / "server.log")
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "FEDHL_S3_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "FEDHL_S3_STAGING_DIR": str(tmp_path_factory.mktemp("s3-staging")),
            # Keep a developer's own AWS setup out of the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            mp.delenv(name, raising=False)
        try:
            yield url
        finally:
            _stop(proc)


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> object:
    # Shared: building a client loads botocore's service model, which is slow per test.
    return client_from_env()


@pytest.fixture
def s3_store(s3_client: object, tmp_path: Path) -> S3BlobStore:
    """A store on a fresh bucket, under a prefix, staging in this test's tmp_path."""
    store = S3BlobStore(
        f"fedhl-test-{uuid.uuid4().hex}",
        "fedhl/blobs",
        client=s3_client,
        staging_dir=tmp_path / "s3-staging",
        check_bucket=False,
    )
    store.ensure_bucket()
    store.check_bucket()
    return store


@pytest.fixture(params=["file", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs")
    store: S3BlobStore = request.getfixturevalue("s3_store")
    return store
