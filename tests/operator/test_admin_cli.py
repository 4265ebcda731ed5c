"""The admin CLI (`fedhl jobs|tokens|agents`, `fedhl export --job`) against the real
coordinator of conftest.py, over REST: every command the README's operator sections use,
their --json output, and the errors an operator meets (401, 404, 409, 422, 5xx, an
unreachable server, an untrusted certificate, no token)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import AGENTS, EXAMPLES, ROUNDS, Stack, run_cli, submit_reviews
from fedhl.agent.scripted import ScriptedAgent
from stack import free_port

Capsys = pytest.CaptureFixture[str]


# -- tokens -----------------------------------------------------------------------------


def test_tokens_create_prints_the_token_alone_and_list_revoke_manage_it(stack: Stack, capsys: Capsys) -> None:
    # Execute: the real console entry point, its stdout captured as a shell would
    out = subprocess.run(
        [sys.executable, "-m", "fedhl.cli", "tokens", "create", "--label", "site-a", "--uses", "2"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
    ).stdout
    # Assert: one line, the token, which enrols an agent
    assert out.endswith("\n") and out.count("\n") == 1
    token = out.strip()
    agent = ScriptedAgent(f"127.0.0.1:{stack.proc.settings.grpc_port}", token, "site-a-1")
    agent.close()
    stack.http.post(f"/agents/{agent.agent_id}/revoke").raise_for_status()  # never selected: it will not train
    code, listed, _ = run_cli(["tokens", "list", "--json"], capsys)
    row = next(t for t in json.loads(listed) if t["label"] == "site-a")
    assert code == 0 and row["uses_left"] == 1 and not row["revoked"] and "token" not in row
    code, table, _ = run_cli(["tokens", "list"], capsys)
    assert code == 0 and "site-a" in table and row["id"] in table
    code, out, _ = run_cli(["tokens", "revoke", row["id"]], capsys)
    assert code == 0 and out.strip() == f"{row['id']}: revoked (site-a)"
    code, listed, _ = run_cli(["tokens", "list", "--json"], capsys)
    assert next(t for t in json.loads(listed) if t["id"] == row["id"])["revoked"] is True


def test_tokens_create_json_has_the_metadata(stack: Stack, capsys: Capsys) -> None:
    argv = ["tokens", "create", "--label", "lab", "--uses", "3", "--expires-in-s", "600", "--json"]
    code, out, _ = run_cli(argv, capsys)
    created = json.loads(out)
    assert code == 0 and created["label"] == "lab" and created["uses_left"] == 3 and created["expires_at"]
    code, out, _ = run_cli(["tokens", "create", "--label", "agent-1"], capsys)  # the README's demo loop
    token = out.strip()
    code, out, _ = run_cli(["tokens", "list", "--json"], capsys)
    assert code == 0 and token and next(t for t in json.loads(out) if t["label"] == "agent-1")["uses_left"] == 1
    code, _, err = run_cli(["tokens", "create", "--uses", "0"], capsys)
    assert code == 1 and "422 invalid request: uses: Input should be greater than or equal to 1" in err


# -- jobs -------------------------------------------------------------------------------


def test_jobs_list_show_watch_of_the_finished_job(stack: Stack, capsys: Capsys) -> None:
    code, out, _ = run_cli(["jobs", "list", "--json"], capsys)
    assert code == 0 and any(j["id"] == stack.job_id for j in json.loads(out))
    code, out, _ = run_cli(["jobs", "list"], capsys)
    assert code == 0 and stack.job_id in out and "COMPLETED" in out and f"{ROUNDS}/{ROUNDS}" in out
    code, out, _ = run_cli(["jobs", "list", "--status", "RUNNING", "--json"], capsys)
    assert code == 0 and all(j["status"] == "RUNNING" for j in json.loads(out))
    assert stack.job_id not in out

    code, out, _ = run_cli(["jobs", "show", stack.job_id, "--json"], capsys)
    shown = json.loads(out)
    assert code == 0 and shown["job"]["status"] == "COMPLETED" and len(shown["rounds"]) == ROUNDS
    accuracy = shown["rounds"][0]["report"]["evaluation"]["accuracy"]
    code, out, _ = run_cli(["jobs", "show", stack.job_id], capsys)
    assert code == 0 and "reviews" in out and f"{accuracy:.3f}" in out and out.count("COMMITTED") == ROUNDS

    code, out, _ = run_cli(["jobs", "watch", stack.job_id], capsys)  # an ended job: one view, exit 0
    assert code == 0 and "COMPLETED" in out and f"{ROUNDS}/{ROUNDS} rounds committed" in out
    code, out, _ = run_cli(["jobs", "watch", stack.job_id, "--json"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 1 and json.loads(lines[0])["job"]["status"] == "COMPLETED"


def test_jobs_watch_follows_a_running_job_to_the_end(stack: Stack, capsys: Capsys) -> None:
    code, out, _ = run_cli(submit_reviews(stack.overrides, "rounds=2", "name=watched"), capsys)
    assert code == 0
    job_id = out.strip()
    code, out, _ = run_cli(["jobs", "watch", job_id, "--json", "--interval", "0.3"], capsys)
    views = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0
    assert views[0]["job"]["status"] == "RUNNING" and views[-1]["job"]["status"] == "COMPLETED"
    assert len(views) >= 3  # it saw the job change while it ran
    assert [r["number"] for r in views[-1]["rounds"] if r["state"] == "COMMITTED"] == [0, 1]


def test_jobs_pause_resume_cancel(stack: Stack, capsys: Capsys) -> None:
    # Prepare: a job that waits for more agents than there are, so it stays put
    submit = submit_reviews(stack.overrides, "selection.count=10", "selection.min_clients=10")
    code, out, _ = run_cli([*submit, "--json"], capsys)
    job = json.loads(out)
    assert code == 0 and job["status"] == "RUNNING" and job["config"]["selection"]["min_clients"] == 10
    # Execute / Assert
    assert run_cli(["jobs", "pause", job["id"]], capsys)[1].strip() == f"{job['id']}: PAUSED"
    assert run_cli(["jobs", "resume", job["id"]], capsys)[1].strip() == f"{job['id']}: RUNNING"
    code, out, _ = run_cli(["jobs", "cancel", job["id"], "--json"], capsys)
    assert code == 0 and json.loads(out)["status"] == "CANCELLED"
    code, out, err = run_cli(["jobs", "cancel", job["id"]], capsys)
    assert code == 1 and out == "" and err.startswith("fedhl jobs cancel: 409 conflict:")
    code, _, err = run_cli(["jobs", "watch", job["id"]], capsys)
    assert code == 1  # it ended without completing


def test_jobs_submit_validates_locally_and_names_the_field(stack: Stack, capsys: Capsys) -> None:
    before = len(stack.http.get("/jobs").json())
    code, out, _ = run_cli(["jobs", "submit", str(EXAMPLES / "capacity.yaml"), "--dry-run"], capsys)
    assert code == 0 and "valid job spec 'reviews-capacity'" in out
    cases = {
        "rounds=0": "rounds: Input should be greater than or equal to 1",
        "selection.fractoin=0.5": "selection.fractoin: Extra inputs are not permitted",
        "rank_policy.kind=biggest": "rank_policy.kind: Input should be 'fixed', 'capacity' or 'random'",
        "strategy=fedsgd": "unknown strategy",
    }
    for override, message in cases.items():
        code, out, err = run_cli(["jobs", "submit", str(EXAMPLES / "capacity.yaml"), "--set", override], capsys)
        assert code == 2 and out == "", override
        assert "invalid job spec" in err and message in err, (override, err)
    bad = stack.tmp / "bad.yaml"
    bad.write_text("name: x\nrank_set: [4\n")
    code, _, err = run_cli(["jobs", "submit", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err
    as_json = stack.tmp / "spec.json"
    as_json.write_text(json.dumps({"name": "j", "base_model": "m", "target_modules": ["q"], "rank_set": [4]}))
    code, _, err = run_cli(["jobs", "submit", str(as_json)], capsys)
    assert code == 2 and "rounds: Field required" in err
    assert len(stack.http.get("/jobs").json()) == before  # nothing was sent


def test_the_server_s_422_reaches_the_operator(stack: Stack, capsys: Capsys) -> None:
    # valid locally, refused by the coordinator: the base model's shapes cannot be read here
    code, _, err = run_cli(["jobs", "submit", str(EXAMPLES / "capacity.yaml")], capsys)
    assert code == 1 and err.startswith("fedhl jobs submit: 422 invalid request: cannot resolve module shapes")


# -- agents -----------------------------------------------------------------------------


def test_agents_list_show_rank_override_revoke(stack: Stack, capsys: Capsys) -> None:
    code, out, _ = run_cli(["agents", "list", "--json"], capsys)
    agents = {a["name"]: a for a in json.loads(out)}
    assert code == 0 and {name for name, _, _ in AGENTS} <= set(agents)
    code, out, _ = run_cli(["agents", "list"], capsys)
    assert code == 0 and "NVIDIA L4" in out and "24.0 GiB" in out
    one = agents["agent-2"]
    code, out, _ = run_cli(["agents", "show", one["id"]], capsys)
    assert code == 0 and "agent-2" in out and "resources.device_memory_bytes" in out
    code, out, _ = run_cli(["agents", "rank-override", one["id"], "8", "--json"], capsys)
    assert code == 0 and json.loads(out)["rank_override"] == 8
    code, out, _ = run_cli(["agents", "rank-override", one["id"], "clear", "--json"], capsys)
    assert code == 0 and json.loads(out)["rank_override"] is None
    code, _, err = run_cli(["agents", "rank-override", one["id"], "0"], capsys)  # refused before sending
    assert code == 2 and "a rank is a positive integer or 'clear'" in err
    # revoke a spare agent (the fixture's crew keeps working for the other tests)
    token = stack.http.post("/agents/enrolment-tokens", json={"label": "spare"}).json()["token"]
    spare = ScriptedAgent(f"127.0.0.1:{stack.proc.settings.grpc_port}", token, "spare")
    spare.close()
    code, out, _ = run_cli(["agents", "revoke", spare.agent_id, "--json"], capsys)  # before a round can pick it
    assert code == 0 and json.loads(out)["status"] == "REVOKED"
    code, _, err = run_cli(["agents", "show", "no-such-agent"], capsys)
    assert code == 1 and err.startswith("fedhl agents show: 404 not found:")


# -- export -----------------------------------------------------------------------------


def test_export_job_writes_a_peft_adapter_that_loads(stack: Stack, capsys: Capsys, tmp_path: Path) -> None:
    from peft import PeftModel

    from fedhl.modeling import load_base

    # Execute
    out_dir = tmp_path / "adapter"
    code, out, _ = run_cli(["export", "--job", stack.job_id, "--rank", "16", "--out", str(out_dir)], capsys)
    # Assert: the latest checkpoint, at rank 16, with the job's alpha and base model
    written = json.loads(out)
    assert code == 0 and written["round"] == ROUNDS and written["rank"] == 16 and written["state_bytes"] > 0
    config = json.loads((out_dir / "adapter_config.json").read_text())
    job = stack.http.get(f"/jobs/{stack.job_id}").json()
    assert config["r"] == 16 and config["lora_alpha"] == job["config"]["lora_alpha"]
    assert config["base_model_name_or_path"] == job["config"]["base_model"] and config["task_type"] == "SEQ_CLS"
    with safe_open(str(out_dir / "adapter_model.safetensors"), "pt") as f:
        a_keys = [k for k in f.keys() if k.endswith("lora_A.weight")]  # noqa: SIM118 (not a mapping)
        assert a_keys and all(f.get_tensor(k).shape[0] == 16 for k in a_keys)
    base, _ = load_base(job["config"]["base_model"], "seq_cls", 2)
    model = PeftModel.from_pretrained(base, str(out_dir))
    assert model.peft_config["default"].r == 16
    # an earlier round, and errors
    export = ["export", "--job", stack.job_id, "--rank", "8", "--round"]
    code, out, _ = run_cli([*export, "1", "--out", str(tmp_path / "r1")], capsys)
    assert code == 0 and json.loads(out)["round"] == 1
    code, _, err = run_cli([*export, "99", "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and "404 not found" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli(["export", "--rank", "4", "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "give --job, or --state with --alpha and --base-model" in err


# -- connection and errors --------------------------------------------------------------


def test_a_wrong_token_is_a_401_message(stack: Stack, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDHL_ADMIN_TOKEN", "wrong-token-0123456789")
    code, out, err = run_cli(["jobs", "list"], capsys)
    assert code == 1 and out == ""
    assert err.strip() == (
        "fedhl jobs list: 401 unauthorised: the coordinator refused the admin token (missing or invalid admin token)"
    )


def test_no_token_and_an_unreachable_server(stack: Stack, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDHL_ADMIN_TOKEN")
    code, _, err = run_cli(["agents", "list"], capsys)
    assert code == 2 and "no admin token: set FEDHL_ADMIN_TOKEN" in err
    monkeypatch.setenv("FEDHL_ADMIN_TOKEN", stack.token)
    port = free_port()  # nothing listens there
    code, _, err = run_cli(["jobs", "list", "--url", f"http://127.0.0.1:{port}"], capsys)
    assert code == 3 and err.startswith(f"fedhl jobs list: cannot reach the coordinator at http://127.0.0.1:{port}")
    # and as a separate process: a message, never a traceback
    done = subprocess.run(
        [sys.executable, "-m", "fedhl.cli", "jobs", "show", "x", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert done.returncode == 3 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_config_file_supplies_url_and_token(stack: Stack, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    config = stack.tmp / "admin.toml"
    config.write_text(f'url = "{stack.url}/api/v1"\ntoken = "{stack.token}"\n')
    config.chmod(0o600)
    monkeypatch.delenv("FEDHL_URL")
    monkeypatch.delenv("FEDHL_ADMIN_TOKEN")
    code, out, _ = run_cli(["jobs", "list", "--json", "--config", str(config)], capsys)
    assert code == 0 and any(j["id"] == stack.job_id for j in json.loads(out))
    config.chmod(0o644)  # a token others can read is refused
    code, _, err = run_cli(["jobs", "list", "--config", str(config)], capsys)
    assert code == 2 and "make it private (chmod 600" in err
    config.write_text('url = "http://x"\ntokn = "t"\n')
    code, _, err = run_cli(["jobs", "list", "--config", str(config)], capsys)
    assert code == 2 and "unknown keys ['tokn']" in err


class _Fixed(BaseHTTPRequestHandler):
    """Answers every request with the class's status and JSON body."""

    status = 200
    body: object = []

    def do_GET(self) -> None:
        data = json.dumps(self.body).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tiny_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Fixed]]]:
    handler = type("Handler", (_Fixed,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_error_is_reported_with_its_status(
    tiny_server: tuple[ThreadingHTTPServer, type[_Fixed]], capsys: Capsys
) -> None:
    server, handler = tiny_server
    handler.status, handler.body = 503, {"detail": "database unavailable"}
    url = f"http://127.0.0.1:{server.server_port}"
    code, _, err = run_cli(["jobs", "list", "--url", url], capsys)
    assert code == 1
    assert err.strip() == (
        "fedhl jobs list: 503 server error on GET /api/v1/jobs: database unavailable (see the coordinator's log)"
    )


def test_tls_with_a_ca_file(
    tiny_server: tuple[ThreadingHTTPServer, type[_Fixed]], capsys: Capsys, tmp_path: Path
) -> None:
    # Prepare: a self-signed certificate for 127.0.0.1, which is also the CA to trust
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server, handler = tiny_server
    handler.body = [{"id": "j1", "name": "tls", "status": "RUNNING", "strategy": "fedhl", "current_round": 0,
                     "rounds": 1, "created_at": "2026-01-01T00:00:00"}]  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.server_port}"
    # Execute / Assert: refused without the CA, answered with it
    code, _, err = run_cli(["jobs", "list", "--url", url], capsys)
    assert code == 3 and "TLS certificate not trusted" in err and "--ca-file" in err
    code, out, _ = run_cli(["jobs", "list", "--json", "--url", url, "--ca-file", str(cert)], capsys)
    assert code == 0 and json.loads(out)[0]["name"] == "tls"
    code, _, err = run_cli(["jobs", "list", "--url", url, "--ca-file", str(tmp_path / "missing.pem")], capsys)
    assert code == 2 and "CA file" in err and "does not exist" in err
