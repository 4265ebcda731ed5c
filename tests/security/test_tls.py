"""TLS by default in production, over real sockets: a production coordinator refuses to start
without TLS on both planes (the message says what to set), starts in plaintext only with
FEDHL_ALLOW_INSECURE=true (and says so), and with certificates from `fedhl certs` serves agents
that verify its CA; an agent with another CA, or dialling a name the certificate does not hold,
stops with an error that says what to fix; gRPC reflection and /docs are off."""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fedhl.agent.client import TLS, AgentClient, TLSError, open_channel
from fedhl.agent.runtime import AgentConfig
from fedhl.certs import ensure_certs
from fedhl.coordinator.tls import require_tls, server_credentials
from fedhl.settings import Settings, SettingsError
from stack import env_for, free_port, job_spec

ADMIN_TOKEN = secrets.token_urlsafe(32)


# Generous: on a loaded CI machine a fresh interpreter can take minutes to import and exit.
SUBPROCESS_TIMEOUT_S = 600


def fedhl(
    *args: str, env: dict[str, str] | None = None, timeout: float = SUBPROCESS_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedhl.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def make_certs(out: Path, *names: str, ca_out: Path | None = None) -> None:
    """What an operator runs: `fedhl certs`, as a command."""
    extra = ["--ca-out", str(ca_out)] if ca_out else []
    done = fedhl("certs", "--out", str(out), *extra, "--name", ",".join(names))
    assert done.returncode == 0, done.stderr


def production(tmp: Path, **overrides: object) -> Settings:
    s = Settings(
        env="production",
        admin_token=ADMIN_TOKEN,
        database_url=f"sqlite:///{tmp}/fedhl.db",
        redis_url=None,
        blob_url=f"file://{tmp}/blobs",
        grpc_host="127.0.0.1",
        grpc_port=free_port(),
        http_host="127.0.0.1",
        http_port=free_port(),
        scheduler_interval_s=0.05,
        pull_wait_max_s=5.0,
    )
    return replace(s, **overrides)  # type: ignore[arg-type]


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------ refusal, with what to set
@pytest.mark.parametrize(
    ("with_tls", "named", "not_named"),
    [
        ((), ["FEDHL_GRPC_TLS_CERT", "FEDHL_HTTP_TLS_CERT"], []),
        (("grpc",), ["FEDHL_HTTP_TLS_CERT", "FEDHL_HTTP_TLS_KEY"], ["FEDHL_GRPC_TLS"]),
        (("http",), ["FEDHL_GRPC_TLS_CERT", "FEDHL_GRPC_TLS_KEY"], ["FEDHL_HTTP_TLS"]),
    ],
)
def test_production_without_tls_refuses_to_start_and_says_what_to_set(
    tmp_path: Path, with_tls: tuple[str, ...], named: list[str], not_named: list[str]
) -> None:
    ensure_certs(tmp_path / "tls", ["localhost"])
    cert, key = str(tmp_path / "tls" / "server.crt"), str(tmp_path / "tls" / "server.key")
    tls = {f"{p}_tls_cert": cert for p in with_tls} | {f"{p}_tls_key": key for p in with_tls}
    settings = production(tmp_path, **tls)
    done = fedhl("coordinator", "--migrate", env=env_for(settings))
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip()
    assert message.startswith("fedhl coordinator: production serves TLS only"), message
    for var in [*named, "FEDHL_ALLOW_INSECURE=true", "fedhl certs --out DIR"]:
        assert var in message, (var, message)
    for var in not_named:
        assert var not in message.split(". ")[0], (var, message)
    assert "Traceback" not in done.stderr
    # nothing was served, nothing was created
    assert not listening(settings.grpc_port) and not listening(settings.http_port)
    assert not (tmp_path / "fedhl.db").exists()


def test_allow_insecure_starts_in_plaintext_and_warns_for_each_plane(tmp_path: Path) -> None:
    settings = production(tmp_path, allow_insecure=True)
    log = tmp_path / "coordinator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedhl.cli", "coordinator", "--migrate"],
            env=env_for(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(f"http://127.0.0.1:{settings.http_port}/healthz", proc, log)
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        proc.wait(120)
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "WARNING" in line and "PLAINTEXT" in line]
    assert len(warnings) == 2, text[-3000:]
    assert any("agent gRPC plane" in w and f":{settings.grpc_port}" in w for w in warnings)
    assert any("admin REST API" in w and f":{settings.http_port}" in w for w in warnings)


def test_development_needs_no_tls_and_warns_about_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = production(tmp_path, env="development")
    require_tls(dev)
    assert server_credentials(dev) is None
    assert "PLAINTEXT" not in caplog.text


def test_unusable_certificate_files_are_named(tmp_path: Path) -> None:
    ensure_certs(tmp_path / "a", ["localhost"])
    ensure_certs(tmp_path / "b", ["localhost"])
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=900)
    ensure_certs(tmp_path / "old", ["localhost"], now=past)  # valid for 825 days from then: expired
    old = tmp_path / "old"

    def refused(cert: Path, key: Path) -> str:
        s = production(tmp_path, grpc_tls_cert=str(cert), grpc_tls_key=str(key))
        s = replace(s, http_tls_cert=str(a / "server.crt"), http_tls_key=str(a / "server.key"))
        with pytest.raises(SettingsError) as err:
            require_tls(s)
        with pytest.raises(SettingsError):
            server_credentials(s)  # the server is never built from them either
        return str(err.value)

    message = refused(a / "server.crt", b / "server.key")
    assert f"{b / 'server.key'} is not the private key of {a / 'server.crt'}" in message
    assert f"{tmp_path / 'junk.pem'}: not a PEM certificate" in refused(tmp_path / "junk.pem", a / "server.key")
    assert f"{tmp_path / 'junk.pem'}: not an unencrypted PEM private key" in refused(
        a / "server.crt", tmp_path / "junk.pem"
    )
    assert re.search(
        r"server\.crt is valid from .* UTC, not now: renew it", refused(old / "server.crt", old / "server.key")
    )


def test_fedhl_certs_keeps_the_ca_and_reissues_for_a_new_name(tmp_path: Path) -> None:
    out, pub = tmp_path / "tls", tmp_path / "pub"
    make_certs(out, "coordinator", "localhost", "127.0.0.1", ca_out=pub)
    ca, server = (out / "ca.crt").read_bytes(), (out / "server.crt").read_bytes()
    assert {p.name for p in pub.iterdir()} == {"ca.crt"} and (pub / "ca.crt").read_bytes() == ca
    for key in ("ca.key", "server.key"):
        assert (out / key).stat().st_mode & 0o777 == 0o600, key
    make_certs(out, "coordinator", "localhost", "127.0.0.1", ca_out=pub)  # every `up`: nothing changes
    assert (out / "ca.crt").read_bytes() == ca and (out / "server.crt").read_bytes() == server
    make_certs(out, "coordinator", "localhost", "127.0.0.1", "agents.example.org", ca_out=pub)
    assert (out / "ca.crt").read_bytes() == ca and (out / "server.crt").read_bytes() != server
    report = fedhl("certs", "--out", str(out), "--name", "agents.example.org")
    assert "CA kept" in report.stdout and "server certificate kept" in report.stdout


# ------------------------------------------------------------------ a TLS coordinator, live
@dataclass
class TLSCoordinator:
    settings: Settings
    ca: Path  # what agents are given (the public copy: no key next to it)
    other_ca: Path  # a CA that did not sign the coordinator's certificate
    http: httpx.Client
    grpc_target: str
    log: Path


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, **kw: object) -> None:
    end = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while time.monotonic() < end:
        assert proc.poll() is None, f"coordinator exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2, **kw).status_code == 200:  # type: ignore[arg-type]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"coordinator did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tls_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSCoordinator]:
    tmp = tmp_path_factory.mktemp("tls-coordinator")
    make_certs(tmp / "tls", "localhost", "127.0.0.1", ca_out=tmp / "agents")
    ensure_certs(tmp / "other", ["localhost", "127.0.0.1"])
    cert, key = str(tmp / "tls" / "server.crt"), str(tmp / "tls" / "server.key")
    settings = production(tmp, grpc_tls_cert=cert, grpc_tls_key=key, http_tls_cert=cert, http_tls_key=key)
    log = tmp / "coordinator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedhl.cli", "coordinator", "--migrate"],
            env=env_for(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    trust = ssl.create_default_context(cafile=str(tmp / "agents" / "ca.crt"))
    try:
        wait_ready(f"https://localhost:{settings.http_port}/healthz", proc, log, verify=trust)
        http = httpx.Client(
            base_url=f"https://localhost:{settings.http_port}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            verify=trust,
            timeout=120,
        )
        yield TLSCoordinator(
            settings, tmp / "agents" / "ca.crt", tmp / "other" / "ca.crt", http, f"localhost:{settings.grpc_port}", log
        )
        http.close()
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def enrolment_token(c: TLSCoordinator) -> str:
    r = c.http.post("/api/v1/agents/enrolment-tokens", json={"label": "tls", "uses": 1})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def test_an_agent_that_verifies_the_ca_registers_and_pulls_a_task(tls_coordinator: TLSCoordinator) -> None:
    c = tls_coordinator
    spec = job_spec(selection={"min_clients": 1, "deadline_s": 600, "quorum": 1.0}, rounds=1)
    assert c.http.post("/api/v1/jobs", json=spec).status_code == 201
    client = AgentClient(c.grpc_target, tls=TLS(c.ca))
    try:
        agent_id, credential = client.register(enrolment_token(c), "tls-agent")
        assert agent_id and credential
        end, task = time.monotonic() + SUBPROCESS_TIMEOUT_S, None
        while task is None and time.monotonic() < end:
            client.heartbeat()
            task = client.pull_task(2)
        assert task is not None, c.log.read_text()[-3000:]
        start = client.download(task.blobs[0][0])  # sha256-checked over the TLS channel
        assert len(start) == task.blobs[0][1] > 0
    finally:
        client.close()
    # the same CA works by IP address (the certificate names 127.0.0.1 too)
    by_ip = AgentClient(f"127.0.0.1:{c.settings.grpc_port}", tls=TLS(c.ca))
    try:
        assert by_ip.register(enrolment_token(c), "tls-agent-ip")[0]
    finally:
        by_ip.close()


def test_an_agent_with_another_ca_stops_with_a_clear_error_and_changes_nothing(
    tls_coordinator: TLSCoordinator,
) -> None:
    c = tls_coordinator
    token = enrolment_token(c)  # single use
    wrong = AgentClient(c.grpc_target, tls=TLS(c.other_ca), retries=5, backoff_s=0.1)
    try:
        with pytest.raises(TLSError) as err:
            wrong.register(token, "wrong-ca")
        assert wrong.stats.retries == 0, "a handshake that cannot succeed is not retried"
    finally:
        wrong.close()
    message = str(err.value)
    assert f"TLS handshake with the coordinator at {c.grpc_target} failed" in message
    assert f"does not verify against the CA in {c.other_ca}" in message
    assert "--tls-ca / FEDHL_AGENT_TLS_CA" in message and "CERTIFICATE_VERIFY_FAILED" in message
    # the token was not spent: an agent with the right CA registers with it
    right = AgentClient(c.grpc_target, tls=TLS(c.ca))
    try:
        assert right.register(token, "right-ca")[0]
    finally:
        right.close()


def test_a_name_the_certificate_does_not_hold_is_refused_and_the_override_is_named(
    tls_coordinator: TLSCoordinator,
) -> None:
    c = tls_coordinator
    client = AgentClient(c.grpc_target, tls=TLS(c.ca, server_name="coordinator.elsewhere.example"), retries=0)
    try:
        with pytest.raises(TLSError, match=r"for the name 'coordinator\.elsewhere\.example'.*--tls-server-name"):
            client.register("unused", "bad-name")
    finally:
        client.close()


def test_plaintext_to_the_tls_port_gets_nowhere(tls_coordinator: TLSCoordinator) -> None:
    c = tls_coordinator
    with grpc.insecure_channel(f"127.0.0.1:{c.settings.grpc_port}") as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{c.settings.http_port}/healthz", timeout=60)


def test_reflection_and_docs_are_off_in_production(tls_coordinator: TLSCoordinator) -> None:
    c = tls_coordinator
    creds = grpc.ssl_channel_credentials(root_certificates=c.ca.read_bytes())
    with grpc.secure_channel(c.grpc_target, creds) as ch:
        # the channel works: health answers
        ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=60))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert c.http.get(path).status_code == 404, path


# ------------------------------------------------------------------ the agent's side, offline
def test_an_agent_refuses_plaintext_to_another_machine_unless_told_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TLSError) as err:
        open_channel("coordinator.example.org:50051")
    message = str(err.value)
    for hint in (
        "--tls-ca / FEDHL_AGENT_TLS_CA",
        "--tls (FEDHL_AGENT_TLS=true)",
        "--insecure (FEDHL_AGENT_INSECURE=true)",
    ):
        assert hint in message, hint
    open_channel("coordinator.example.org:50051", insecure=True).close()  # no connection is attempted
    assert "PLAINTEXT to coordinator.example.org:50051" in caplog.text
    for local in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "dns:///localhost:50051"):
        open_channel(local).close()


def test_agent_tls_settings_come_from_flags_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_certs(tmp_path / "tls", ["localhost"])
    ca = tmp_path / "tls" / "ca.crt"
    for key in [k for k in os.environ if k.startswith("FEDHL_AGENT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FEDHL_AGENT_TLS_CA", str(ca))
    monkeypatch.setenv("FEDHL_AGENT_TLS_SERVER_NAME", "coordinator")
    cfg = AgentConfig.from_env(coordinator="10.0.0.5:50051", data=str(tmp_path / "d.jsonl"))
    assert cfg.tls == TLS(ca, None, None, "coordinator") and cfg.insecure is False
    monkeypatch.delenv("FEDHL_AGENT_TLS_CA")
    monkeypatch.delenv("FEDHL_AGENT_TLS_SERVER_NAME")
    monkeypatch.setenv("FEDHL_AGENT_INSECURE", "true")
    cfg = AgentConfig.from_env(coordinator="10.0.0.5:50051", data=str(tmp_path / "d.jsonl"))
    assert cfg.tls is None and cfg.insecure is True
    assert AgentConfig.from_env(coordinator="c:1", data="d", tls=True).tls == TLS()  # system roots
    with pytest.raises(SettingsError, match="does not exist"):
        AgentConfig.from_env(coordinator="c:1", data="d", tls_ca=str(tmp_path / "missing.crt"))
    with pytest.raises(SettingsError, match="go together"):
        AgentConfig.from_env(coordinator="c:1", data="d", tls_ca=str(ca), tls_cert=str(ca))
