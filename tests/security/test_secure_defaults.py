"""Secure defaults, one audit item per test: placeholder and weak secrets refused in production,
loopback in development, passwords never echoed, docs and reflection off in production,
unexpected errors answered with an error id only (REST and gRPC), credential file fsynced."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient

from fedhl.agent.runtime import Credentials
from fedhl.coordinator.api import create_app
from fedhl.coordinator.app import Coordinator
from fedhl.coordinator.grpc_errors import ErrorIdInterceptor
from fedhl.redact import RedactingFilter, redact
from fedhl.settings import Settings, SettingsError

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"
HINT = "secrets.token_urlsafe(32)"
SQL_TEXT = "(psycopg.errors.X) SELECT * FROM updates WHERE agent_id = 'other-agent-0001'"


def example_admin_token() -> str:
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("FEDHL_ADMIN_TOKEN="):
            return line.split("=", 1)[1]
    raise AssertionError(".env.example has no FEDHL_ADMIN_TOKEN")


@pytest.mark.parametrize(
    "token",
    [
        example_admin_token(),
        "REPLACE_ME",
        "change-me-please-0123456789abcdef",
        "x" * 64,
        "abcdefghijklmnop",
        "dev-admin-token",
    ],
)
def test_placeholder_or_weak_admin_token_is_refused_in_production(token: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(HINT)):
        Settings.from_env({"FEDHL_ADMIN_TOKEN": token})


def test_generated_tokens_are_accepted_and_development_keeps_its_token() -> None:
    for token in (secrets.token_urlsafe(32), secrets.token_hex(16), secrets.token_hex(32)):
        assert Settings.from_env({"FEDHL_ADMIN_TOKEN": token}).admin_token == token
    assert Settings.from_env({"FEDHL_ENV": "development"}).admin_token


def test_placeholder_database_password_is_refused_in_production() -> None:
    url = "postgresql://fedhl:CHANGE-ME-postgres-password@postgres:5432/fedhl"
    with pytest.raises(SettingsError, match="FEDHL_DATABASE_URL") as err:
        Settings.from_env({"FEDHL_ADMIN_TOKEN": secrets.token_urlsafe(32), "FEDHL_DATABASE_URL": url})
    assert "CHANGE-ME-postgres-password" not in str(err.value)


def test_development_binds_loopback_production_all_interfaces_unless_configured() -> None:
    dev = Settings.from_env({"FEDHL_ENV": "development"})
    assert (dev.http_host, dev.grpc_host) == ("127.0.0.1", "127.0.0.1")
    prod = Settings.from_env({"FEDHL_ADMIN_TOKEN": secrets.token_urlsafe(32)})
    assert (prod.http_host, prod.grpc_host) == ("0.0.0.0", "0.0.0.0")
    assert Settings.from_env({"FEDHL_ENV": "development", "FEDHL_HTTP_HOST": "0.0.0.0"}).http_host == "0.0.0.0"


def test_docs_and_reflection_default_off_in_production_on_in_development() -> None:
    prod = Settings.from_env({"FEDHL_ADMIN_TOKEN": secrets.token_urlsafe(32)})
    assert (prod.api_docs, prod.grpc_reflection) == (False, False)
    dev = Settings.from_env({"FEDHL_ENV": "development"})
    assert (dev.api_docs, dev.grpc_reflection) == (True, True)
    assert Settings.from_env({"FEDHL_ENV": "development", "FEDHL_API_DOCS": "false"}).api_docs is False


@pytest.mark.parametrize(
    "env",
    [
        {"FEDHL_DATABASE_URL": "mysql://fedhl:hunter2-secret@db/fedhl"},
        {"FEDHL_REDIS_URL": "http://:hunter2-secret@redis:6379/0"},
    ],
)
def test_configuration_errors_never_echo_passwords(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"FEDHL_ENV": "development", **env})
    assert "hunter2-secret" not in str(err.value) and "***" in str(err.value)


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("fedhl.test.redact")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="fedhl.test.redact"):
        log.info("connecting to %s", "postgresql://fedhl:hunter2-secret@db:5432/fedhl")
        try:
            raise RuntimeError("redis://:hunter2-secret@redis:6379 refused; header Bearer abc.def")
        except RuntimeError:
            log.exception("failed")
    assert "hunter2-secret" not in caplog.text and "abc.def" not in caplog.text
    assert "postgresql://fedhl:***@db:5432/fedhl" in caplog.text
    assert redact("rediss://user:p%40ss@host/0") == "rediss://user:***@host/0"


def test_docs_switched_off_are_404(coordinator: Coordinator) -> None:
    off = dataclasses.replace(coordinator, settings=dataclasses.replace(coordinator.settings, api_docs=False))
    with TestClient(create_app(off)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path
    with TestClient(create_app(coordinator)) as client:
        assert client.get("/openapi.json").status_code == 200


def test_rest_unexpected_error_is_500_with_an_error_id_only(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(SQL_TEXT)

    monkeypatch.setattr(coordinator.jobs, "pause", broken)
    headers = {"Authorization": f"Bearer {coordinator.settings.admin_token}"}
    with TestClient(create_app(coordinator), headers=headers) as client:
        r = client.post("/api/v1/jobs/some-job/pause")
    assert r.status_code == 500
    body = r.json()
    assert set(body) == {"detail", "error_id"} and re.fullmatch(r"[0-9a-f]{16}", body["error_id"])
    assert "SELECT" not in r.text and "other-agent" not in r.text
    assert body["error_id"] in caplog.text and SQL_TEXT in caplog.text  # the operator sees the cause


def test_grpc_unexpected_error_is_internal_with_an_error_id_only(caplog: pytest.LogCaptureFixture) -> None:
    def fails(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError(SQL_TEXT)

    def refuses(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "revoked")
        raise AssertionError("unreachable")

    def decode(data: bytes) -> bytes:
        from google.protobuf.message import DecodeError

        if data == b"bad":
            raise DecodeError("truncated")
        return data

    handlers = {
        "Fails": grpc.unary_unary_rpc_method_handler(fails, decode, lambda b: b),
        "Refuses": grpc.unary_unary_rpc_method_handler(refuses, decode, lambda b: b),
    }
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[ErrorIdInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            outcomes = {}
            for method, payload in (("Fails", b"ok"), ("Refuses", b"ok"), ("Fails", b"bad")):
                with pytest.raises(grpc.RpcError) as err:
                    ch.unary_unary(f"/t.S/{method}", lambda b: b, lambda b: b)(payload, timeout=10)
                outcomes[(method, payload)] = (err.value.code(), err.value.details())
    finally:
        server.stop(0)
    code, details = outcomes[("Fails", b"ok")]
    assert code == grpc.StatusCode.INTERNAL
    match = re.fullmatch(r"internal error \(error id ([0-9a-f]{16})\)", details)
    assert match and match[1] in caplog.text and SQL_TEXT in caplog.text
    assert outcomes[("Refuses", b"ok")] == (grpc.StatusCode.PERMISSION_DENIED, "revoked")
    assert outcomes[("Fails", b"bad")][0] == grpc.StatusCode.INVALID_ARGUMENT


def test_agent_credential_file_and_directory_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    state = tmp_path / "state"
    Credentials(state, "coordinator:50051").save("agent-1", "secret-credential")
    assert synced == [str(state / "credential.tmp"), str(state)]
    assert Credentials(state, "coordinator:50051").load() == ("agent-1", "secret-credential")
    assert (state / "credential.json").stat().st_mode & 0o777 == 0o600
