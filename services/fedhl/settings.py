"""Service configuration from `FEDHL_*` environment variables, validated at start: the one
place that reads them (the agent's `FEDHL_AGENT_*` flags included, see `agent.runtime`).

Read through `get_settings()` (cached), never at import time, so tests and subprocesses can
set the environment first. Each value is checked when set; what only one process needs is
required by that process (the admin token by the coordinator: `require_admin_token`), so
`fedhl migrate` and `fedhl aggregator` run without it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from sqlalchemy import Engine

from .backends import WorkerOptions
from .redact import redact
from .storage.coordination import Coordination, open_coordination
from .storage.db import make_engine
from .storage.gc import Retention

DEV_ADMIN_TOKEN = "dev-admin-token"
GENERATE_SECRET = 'generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
# Values published in this repository's examples and templates; none may guard a production service.
KNOWN_EXAMPLE_SECRETS = frozenset(
    {
        DEV_ADMIN_TOKEN,
        "CHANGE-ME-admin-token-0123456789",  # .env.example
        "test-admin-token-0123456789",
        "REPLACE_ME",
        "PASSWORD",
    }
)
_PLACEHOLDER_MARKERS = ("change-me", "change_me", "changeme", "replace-me", "replace_me", "replaceme", "placeholder")
_PLACEHOLDER = "is a placeholder or a published example value"
MIN_SECRET_BITS = 80  # token_urlsafe(32) estimates at ~210 bits, token_hex(16) at ~110, `openssl rand -hex 32` at ~240


def estimated_bits(secret: str) -> float:
    """Length × the empirical entropy of its characters: a cheap lower-ish bound that refuses
    repeated, short or small-alphabet tokens (not a proof of randomness)."""
    counts, n = Counter(secret), len(secret)
    per_char = -sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0
    return max(0.0, n * per_char)


def secret_problem(secret: str) -> str | None:
    """Why `secret` must not guard a production service, or None."""
    if secret in KNOWN_EXAMPLE_SECRETS or any(m in secret.lower() for m in _PLACEHOLDER_MARKERS):
        return _PLACEHOLDER
    bits = estimated_bits(secret)
    if bits < MIN_SECRET_BITS:
        return f"is too weak (about {bits:.0f} bits of entropy; at least {MIN_SECRET_BITS} needed)"
    return None


def url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 for an `s3://` blob URL; credentials come from boto3's usual chain."""

    endpoint_url: str | None = None  # FEDHL_S3_ENDPOINT_URL: MinIO, moto; unset for AWS
    staging_dir: str | None = None  # FEDHL_S3_STAGING_DIR: resumable uploads before their hash is checked
    region: str = "us-east-1"  # AWS_REGION

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if environ is None else environ
        return cls(
            env.get("FEDHL_S3_ENDPOINT_URL") or None,
            env.get("FEDHL_S3_STAGING_DIR") or None,
            env.get("AWS_REGION") or "us-east-1",
        )


@dataclass(frozen=True)
class Settings:
    env: Literal["production", "development"] = "production"
    database_url: str = "sqlite:///./fedhl.db"
    redis_url: str | None = None  # unset: in-process liveness/queue/events (embedded mode)
    blob_url: str = "file://./fedhl-blobs"
    admin_token: str = ""
    # "": all interfaces (0.0.0.0) in production, loopback (127.0.0.1) in development
    grpc_host: str = ""
    grpc_port: int = 50051
    http_host: str = ""
    http_port: int = 8080
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    grpc_tls_client_ca: str | None = None  # set: mTLS, agents must present a client certificate
    http_tls_cert: str | None = None
    http_tls_key: str | None = None
    # Production serves both planes over TLS (coordinator.tls); true: plaintext is allowed there,
    # with a warning at every start. Development never requires TLS.
    allow_insecure: bool = False
    # The agent plane (grpc.aio: an open call holds no thread; blocking work runs in bounded pools)
    grpc_max_workers: int = 64  # threads for the database work of agent calls
    grpc_max_transfers: int = 32  # upload/download streams at once (each holds a thread while it moves bytes)
    grpc_max_calls: int = 256  # other calls in progress at once (PullTask waits not counted)
    grpc_max_waits: int = 20000  # PullTask long-polls held at once
    grpc_max_calls_per_agent: int = 4  # one agent's calls at once, waits and transfers included
    grpc_retry_after_s: int = 2  # `retry-after` sent with RESOURCE_EXHAUSTED when a cap is full
    grpc_max_db_backlog: int = 256  # agent calls queued for a database thread before new ones are refused
    # group commit (coordinator/batcher.py): claims and accepts of many agents share a transaction
    db_batch_workers: int = 2  # threads per batcher (claims; accepts)
    db_batch_max: int = 256  # items per transaction at most
    grpc_queue_s: float = 5.0  # a call or transfer finding its cap full waits this long for a slot (0: refuse at once)
    grpc_call_timeout_s: float = 30.0  # server-side deadline of a unary call (waits: pull_wait_max_s)
    grpc_stream_idle_s: float = 60.0  # a transfer stream silent this long ends with DEADLINE_EXCEEDED
    grpc_keepalive_s: float = 60.0  # the server pings a connection idle this long (dead peers are dropped)
    grpc_max_connection_idle_s: float = 600.0  # a connection without calls this long is closed
    grpc_max_connection_age_s: float = 1800.0  # connections are recycled (spreads agents over replicas)
    grpc_max_streams_per_connection: int = 100  # HTTP/2 concurrent streams on one connection
    heartbeat_ttl_s: float = 15.0
    pull_wait_max_s: float = 20.0  # a small fleet's long-poll
    pull_wait_fleet_max_s: float = 120.0  # a large fleet's long-polls lengthen up to this (fleet_calls_per_s)
    # the plane finds every agent with a task to claim in one query this often (a lost round event
    # delays a task by at most this); while that sweep fails, waits re-read per agent this often
    pull_recheck_s: float = 15.0
    auth_cache_size: int = 100_000  # credentials (as sha256 digests) remembered per process
    # a cached credential is re-checked after this; revocation reaches this replica at once by
    # event, and by the agent plane's sweep (every pull_recheck_s) if that event is lost
    auth_cache_ttl_s: float = 900.0
    fleet_calls_per_s: float = 100.0  # long-polls and heartbeats lengthen so the fleet sends about this many per second
    register_per_peer: int = 30  # Register calls per peer per minute
    register_per_token: int = 120  # Register calls per enrolment token per minute
    scheduler_interval_s: float = 0.2
    chunk_bytes: int = 1 << 20
    max_upload_bytes: int = 4 << 30
    max_request_bytes: int = 1 << 20  # REST request bodies (job specs, tokens): 413 above
    max_concurrent_validations: int = 4  # uploads hashed and validated at once; more wait, then RESOURCE_EXHAUSTED
    inprocess_aggregator: bool = True  # run the aggregation worker loop inside the coordinator
    aggregation_shards: int = 1  # aggregation tasks per round (module shards), for several workers
    aggregator_reclaim_idle_s: float = 60.0  # a task pending this long on a silent worker is taken over
    aggregator_max_deliveries: int = 5  # deliveries of one aggregation task before dead-letter + job pause
    max_round_attempts: int = 5  # failed attempts of one round in a row before the job pauses
    loop_stale_s: float = 30.0  # /readyz fails for a background loop without a tick this long
    # `fedhl coordinator` runs Python's full garbage collection this often instead of whenever
    # the heap has grown by a quarter (a 5,000-agent fleet: a 0.2-0.5 s pause every few seconds;
    # fedhl/gcpause.py); 0: Python's own policy
    gc_full_every_s: float = 600.0
    db_connect_timeout_s: float = 5.0  # Postgres connect and pool checkout
    db_statement_timeout_s: float = 30.0  # Postgres statement_timeout of every query
    redis_connect_timeout_s: float = 5.0
    redis_socket_timeout_s: float = 10.0  # every Redis call; must exceed the worker's 1 s blocking read
    blob_keep_checkpoints: int = 5  # per job, with the rounds that produced them; older blobs are deleted
    blob_min_age_s: float = 3600.0  # the blob GC never deletes anything younger
    staging_max_age_s: float = 86400.0  # partial uploads untouched this long are removed
    blob_gc_interval_s: float = 3600.0  # how often the leader collects; 0: never (use `fedhl gc`)
    aggregator_device: str | None = None  # "cuda", "cpu"; unset: CUDA when present
    aggregator_metrics_port: int = 0  # Prometheus endpoint of an aggregator worker; 0: none
    s3_endpoint_url: str | None = None  # see S3Settings
    s3_staging_dir: str | None = None
    s3_region: str = "us-east-1"  # from AWS_REGION (the variable boto3 users already set)
    # OpenAPI pages (/docs, /redoc, /openapi.json) and gRPC server reflection; unset: on in
    # development, off in production (they map the attack surface for anyone who can connect).
    api_docs: bool | None = None
    grpc_reflection: bool | None = None

    def __post_init__(self) -> None:
        if self.env not in ("production", "development"):
            raise SettingsError(f"FEDHL_ENV must be 'production' or 'development', got {self.env!r}")
        dev = self.env == "development"
        for name in ("grpc_host", "http_host"):
            if not getattr(self, name):
                object.__setattr__(self, name, "127.0.0.1" if dev else "0.0.0.0")
        for name in ("api_docs", "grpc_reflection"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, dev)
        if self.admin_token and not dev and (problem := secret_problem(self.admin_token)):
            raise SettingsError(f"FEDHL_ADMIN_TOKEN {problem} in production: {GENERATE_SECRET}")
        if not self.database_url.startswith(("sqlite", "postgresql")):
            raise SettingsError(
                f"FEDHL_DATABASE_URL must be sqlite:// or postgresql://, got {redact(self.database_url)!r}"
            )
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                f"FEDHL_REDIS_URL must be redis://, rediss:// or unix://, got {redact(self.redis_url)!r}"
            )
        if not dev:
            for name, url in (("FEDHL_DATABASE_URL", self.database_url), ("FEDHL_REDIS_URL", self.redis_url or "")):
                password = url_password(url)
                if password and (password in KNOWN_EXAMPLE_SECRETS or secret_problem(password) == _PLACEHOLDER):
                    raise SettingsError(f"{name} holds a placeholder password in production: {GENERATE_SECRET}")
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise SettingsError(f"FEDHL_{name.upper()} must be a port number, got {port}")
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise SettingsError("FEDHL_GRPC_TLS_CERT and FEDHL_GRPC_TLS_KEY go together")
        if self.grpc_tls_client_ca and not self.grpc_tls_cert:
            raise SettingsError("FEDHL_GRPC_TLS_CLIENT_CA (mTLS) needs FEDHL_GRPC_TLS_CERT/KEY")
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise SettingsError("FEDHL_HTTP_TLS_CERT and FEDHL_HTTP_TLS_KEY go together")
        for name in (
            "grpc_tls_cert",
            "grpc_tls_key",
            "grpc_tls_client_ca",
            "http_tls_cert",
            "http_tls_key",
        ):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"FEDHL_{name.upper()}: no such file {path}")
        positive = (
            "aggregation_shards",
            "aggregator_reclaim_idle_s",
            "aggregator_max_deliveries",
            "max_round_attempts",
            "loop_stale_s",
            "blob_keep_checkpoints",
            "staging_max_age_s",
            "db_connect_timeout_s",
            "db_statement_timeout_s",
            "redis_connect_timeout_s",
            "grpc_max_workers",
            "grpc_max_transfers",
            "grpc_max_calls",
            "grpc_max_waits",
            "grpc_max_calls_per_agent",
            "grpc_retry_after_s",
            "grpc_max_db_backlog",
            "db_batch_workers",
            "db_batch_max",
            "grpc_call_timeout_s",
            "grpc_stream_idle_s",
            "grpc_keepalive_s",
            "grpc_max_connection_idle_s",
            "grpc_max_connection_age_s",
            "grpc_max_streams_per_connection",
            "heartbeat_ttl_s",
            "pull_wait_max_s",
            "pull_wait_fleet_max_s",
            "pull_recheck_s",
            "auth_cache_size",
            "auth_cache_ttl_s",
            "fleet_calls_per_s",
            "register_per_peer",
            "register_per_token",
            "scheduler_interval_s",
            "chunk_bytes",
            "max_upload_bytes",
            "max_request_bytes",
            "max_concurrent_validations",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingsError(f"FEDHL_{name.upper()} must be positive, got {getattr(self, name)}")
        if not self.grpc_queue_s >= 0:
            raise SettingsError(f"FEDHL_GRPC_QUEUE_S must be >= 0, got {self.grpc_queue_s}")
        if not self.gc_full_every_s >= 0:
            raise SettingsError(f"FEDHL_GC_FULL_EVERY_S must be >= 0 (0: Python's policy), got {self.gc_full_every_s}")
        if not (self.blob_min_age_s >= 0 and self.blob_gc_interval_s >= 0):
            raise SettingsError("FEDHL_BLOB_MIN_AGE_S and FEDHL_BLOB_GC_INTERVAL_S must be >= 0")
        if not self.redis_socket_timeout_s > 1.0:
            raise SettingsError("FEDHL_REDIS_SOCKET_TIMEOUT_S must exceed 1 s (the worker's blocking read)")
        if self.chunk_bytes > 3 << 20:
            raise SettingsError("FEDHL_CHUNK_BYTES must stay under gRPC's 4 MiB message limit")

    def __repr__(self) -> str:
        """Tracebacks and logs show settings: never the token, nor a password inside a URL."""
        shown = (
            f"{f.name}={'***' if f.name == 'admin_token' else redact(repr(getattr(self, f.name)))}"
            for f in fields(self)
        )
        return f"Settings({', '.join(shown)})"

    def require_admin_token(self) -> None:
        """The coordinator's admin API cannot run without a token."""
        if not self.admin_token:
            raise SettingsError(
                f"FEDHL_ADMIN_TOKEN is required ({GENERATE_SECRET}; or set FEDHL_ENV=development for a dev token)"
            )

    @property
    def worker_options(self) -> WorkerOptions:
        return WorkerOptions(self.aggregator_reclaim_idle_s, self.aggregator_max_deliveries, 1.0, self.loop_stale_s)

    @property
    def retention(self) -> Retention:
        return Retention(self.blob_keep_checkpoints, self.blob_min_age_s, self.staging_max_age_s)

    def engine(self) -> Engine:
        """The database engine with this configuration's timeouts."""
        return make_engine(
            self.database_url,
            connect_timeout_s=self.db_connect_timeout_s,
            statement_timeout_s=self.db_statement_timeout_s,
        )

    def coordination(self) -> Coordination:
        """Redis (or in-process) coordination with this configuration's timeouts."""
        return open_coordination(
            self.redis_url, socket_timeout_s=self.redis_socket_timeout_s, connect_timeout_s=self.redis_connect_timeout_s
        )

    @property
    def s3(self) -> S3Settings:
        return S3Settings(self.s3_endpoint_url, self.s3_staging_dir, self.s3_region)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"FEDHL_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kind = str(f.type)
            try:
                if kind == "int":
                    values[f.name] = int(raw)
                elif kind == "float":
                    values[f.name] = float(raw)
                elif kind in ("bool", "bool | None"):
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    values[f.name] = raw.lower() in ("1", "true", "yes")
                else:
                    values[f.name] = raw
            except ValueError:
                raise SettingsError(f"FEDHL_{f.name.upper()}: cannot parse {redact(raw)!r} as {kind}") from None
        if env.get("AWS_REGION") and "s3_region" not in values:
            values["s3_region"] = env["AWS_REGION"]
        if values.get("env") == "development" and "admin_token" not in values:
            values["admin_token"] = DEV_ADMIN_TOKEN
        return cls(**values)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
