"""The real agent end to end, as processes: `fedhl coordinator` + `fedhl agent` × 3 over loopback
gRPC on a tiny random-config BERT and toy data, against Postgres + Redis and against the
embedded default; the exported adapter reproduces the evaluated accuracy; an agent killed
mid-training is dropped at the deadline and the round commits with quorum; agents reconnect
after a coordinator restart."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from tiny_models import toy_examples, write_bert, write_tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedhl.evaluation import evaluate_model
from stack import BACKENDS, Proc, coordinator, wait_job


def write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    model = tmp_path / "tiny-bert"
    write_bert(model)
    write_tokenizer(model)
    data = []
    for i in range(3):
        data.append(tmp_path / f"agent-{i}.jsonl")
        write_jsonl(data[-1], toy_examples(96, seed=10 + i))
    write_jsonl(tmp_path / "eval.jsonl", toy_examples(64, seed=99))
    return model, data, tmp_path / "eval.jsonl"


def spec(model: Path, eval_path: Path, **over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "name": "tiny",
        "base_model": str(model),
        "task_type": "seq_cls",
        "num_labels": 2,
        "target_modules": ["query", "value"],
        "rank_set": [2, 4],
        "lora_alpha": 8.0,
        "rank_policy": {"kind": "fixed", "fixed": {"agent-0": 2, "agent-1": 4, "agent-2": 4}},
        "rounds": 2,
        "train": {"local_steps": 8, "lr": 1e-2, "head_lr": 5e-2, "batch_size": 16, "max_seq_len": 16},
        "selection": {"count": 3, "min_clients": 3, "deadline_s": 120},
        "evaluation": {"path": str(eval_path)},
        "seed": 3,
    }
    s.update(over)
    return s


@contextmanager
def agents(proc: Proc, data: list[Path], token: str, tmp: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**proc.env, "HF_HUB_OFFLINE": "1"}
    procs = []
    for i, path in enumerate(data):
        with (tmp / f"agent-{i}.log").open("ab") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fedhl.cli",
                        "agent",
                        "--coordinator",
                        f"127.0.0.1:{proc.settings.grpc_port}",
                        "--token",
                        token,
                        "--data",
                        str(path),
                        "--name",
                        f"agent-{i}",
                        "--state-dir",
                        str(tmp / f"state-{i}"),
                        "--threads",
                        "1",
                        "--device",
                        "cpu",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def enrol(http: httpx.Client, uses: int = 3) -> str:
    return str(
        http.post("/agents/enrolment-tokens", json={"label": "e2e", "uses": uses}).raise_for_status().json()["token"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_agents_train_and_the_exported_adapter_reproduces_the_evaluation(
    backend: str, world: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    model, data, eval_path = world
    with coordinator(backend, tmp_path) as (proc, http):
        token = enrol(http)
        job = http.post("/jobs", json=spec(model, eval_path)).raise_for_status().json()
        with agents(proc, data, token, tmp_path) as procs:
            wait_job(http, job["id"], "COMPLETED", timeout=240)
            assert all(p.poll() is None for p in procs), "an agent died"
        rounds = [r for r in http.get(f"/jobs/{job['id']}/rounds").json() if r["state"] == "COMMITTED"]
        assert [r["number"] for r in rounds] == [0, 1]
        evaluation = rounds[-1]["report"]["evaluation"]
        assert set(evaluation) >= {"accuracy", "loss"}
        state = tmp_path / "state.safetensors"
        state.write_bytes(http.get(f"/jobs/{job['id']}/checkpoints/2/state").raise_for_status().content)
    _simulate_matches(spec(model, eval_path), data, eval_path, state, evaluation)
    for i in range(3):  # credentials are private to the agent's user
        mode = stat.S_IMODE(os.stat(tmp_path / f"state-{i}" / "credential.json").st_mode)
        assert mode == 0o600

    out = tmp_path / "adapter"
    full_rank = 32  # the tiny BERT's hidden size: the export is lossless
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhl.cli",
            "export",
            "--state",
            str(state),
            "--rank",
            str(full_rank),
            "--alpha",
            "8",
            "--base-model",
            str(model),
            "--task-type",
            "SEQ_CLS",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    loaded = PeftModel.from_pretrained(base, out).eval()
    tok = AutoTokenizer.from_pretrained(model)
    from fedhl.data import load_examples

    with torch.no_grad():
        metrics = evaluate_model(loaded, tok, load_examples(eval_path, "seq_cls", 2), "seq_cls", max_seq_len=16)
    assert metrics["accuracy"] == pytest.approx(evaluation["accuracy"])
    assert metrics["loss"] == pytest.approx(evaluation["loss"], abs=1e-4)


def _simulate_matches(
    job: dict[str, Any], data: list[Path], eval_path: Path, state_file: Path, evaluation: dict[str, float]
) -> None:
    """`fedhl simulate`'s loop on the same spec, data and seed reaches the state the coordinator,
    the aggregator and three agent processes reached. Not bit for bit: the coordinator merges
    with torch's default thread count, this process with one, so float32 sums round differently
    (measured: max |Δ| ≈ 3e-7 on entries up to 0.23, i.e. ~1e-6 relative)."""
    from fedhl.codec import load_state
    from fedhl.data import load_examples
    from fedhl.jobspec import JobSpec
    from fedhl.simulation import SimClient, simulate

    ranks = job["rank_policy"]["fixed"]
    clients = [SimClient(f"agent-{i}", ranks[f"agent-{i}"], load_examples(p, "seq_cls", 2)) for i, p in enumerate(data)]
    sim_state, rows = simulate(JobSpec.model_validate(job), clients, load_examples(eval_path, "seq_cls", 2))
    served = load_state(state_file)
    assert sim_state.round == served.round == 2
    assert set(sim_state.dense) == set(served.dense) and sim_state.dense
    for m, w in served.dense.items():
        torch.testing.assert_close(sim_state.dense[m], w, rtol=1e-5, atol=2e-6, msg=m)
    for k, v in served.extras.items():
        torch.testing.assert_close(sim_state.extras[k], v, rtol=1e-5, atol=1e-7, msg=k)
    assert rows[-1]["accuracy"] == pytest.approx(evaluation["accuracy"])
    assert rows[-1]["loss"] == pytest.approx(evaluation["loss"], abs=1e-5)
    assert [r["participants"] for r in rows] == [3, 3] and all(r["bytes_uploaded"] > 0 for r in rows)


def test_a_killed_agent_is_dropped_at_the_deadline_and_agents_survive_a_coordinator_restart(
    world: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    model, data, eval_path = world
    job_spec = spec(
        model, eval_path, rounds=3, selection={"count": 3, "min_clients": 2, "deadline_s": 15, "quorum": 0.6}
    )
    with coordinator("sqlite+inprocess", tmp_path) as (proc, http):
        token = enrol(http)
        with agents(proc, data, token, tmp_path) as procs:
            end = time.monotonic() + 120
            # all three enrolled before the job exists: a round opens as soon as min_clients (2) agents are
            # live, and a first round of two, one of them killed, fails instead of closing with quorum
            while time.monotonic() < end and len(http.get("/agents").json()) < 3:
                time.sleep(0.1)
            job = http.post("/jobs", json=job_spec).raise_for_status().json()
            victim_round = None
            while time.monotonic() < end and victim_round is None:
                agents_by_id = {a["id"]: a["name"] for a in http.get("/agents").json()}
                for r in http.get(f"/jobs/{job['id']}/rounds").json():
                    detail = http.get(f"/jobs/{job['id']}/rounds/{r['id']}").json()
                    if any(
                        agents_by_id.get(a["agent_id"]) == "agent-2" and a["state"] == "RUNNING"
                        for a in detail["assignments"]
                    ):
                        victim_round = r["id"]
                time.sleep(0.05)
            assert victim_round is not None
            procs[2].send_signal(signal.SIGKILL)  # mid-task: pulled, training or uploading
            closed = None
            while time.monotonic() < end and closed is None:
                rounds = {r["id"]: r for r in http.get(f"/jobs/{job['id']}/rounds").json()}
                closed = rounds[victim_round] if rounds[victim_round]["state"] == "COMMITTED" else None
                time.sleep(0.2)
            assert closed is not None and len(closed["report"]["clients"]) == 2  # closed at the deadline with quorum
            proc.kill()  # the coordinator dies; the two live agents must reconnect on their own
            time.sleep(1.0)
            proc.start()
            final = wait_job(http, job["id"], "COMPLETED", timeout=180)
            assert procs[0].poll() is None and procs[1].poll() is None
        assert final["current_round"] == 3


def test_full_view_agents_rebuild_the_global_update_and_train_on_it(
    world: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    """`fedhl agent` processes under FedHL's full view: each rebuilds the global update from the
    round's change, holds the server's checkpoint bit for bit, and the job reaches the state
    `fedhl simulate` (same factored downlink) reaches."""
    from fedhl.codec import load_state
    from fedhl.core.downlink import state_hashes

    model, data, eval_path = world
    train = {"local_steps": 4, "lr": 1e-2, "head_lr": 5e-2, "batch_size": 16, "max_seq_len": 16}
    job_spec = spec(model, eval_path, rounds=2, strategy="fedhl", strategy_options={"client_view": "full"}, train=train)
    del job_spec["evaluation"]
    with coordinator("sqlite+inprocess", tmp_path) as (proc, http):
        token = enrol(http)
        job = http.post("/jobs", json=job_spec).raise_for_status().json()
        with agents(proc, data, token, tmp_path) as procs:
            wait_job(http, job["id"], "COMPLETED", timeout=240)
            assert all(p.poll() is None for p in procs), "an agent died"
        rounds = [r for r in http.get(f"/jobs/{job['id']}/rounds").json() if r["state"] == "COMMITTED"]
        assert [r["report"]["downlink"]["client_view"] for r in rounds] == ["full"] * 2
        held_v1 = tmp_path / "v1.safetensors"
        held_v1.write_bytes(http.get(f"/jobs/{job['id']}/checkpoints/1/state").raise_for_status().content)
        final = tmp_path / "state.safetensors"
        final.write_bytes(http.get(f"/jobs/{job['id']}/checkpoints/2/state").raise_for_status().content)
    want = state_hashes(load_state(held_v1).dense)
    for i in range(3):  # every agent trained in round 1 on the global update of version 1, rebuilt
        held = load_state(tmp_path / f"state-{i}" / "global" / f"{job['id']}.safetensors")
        assert held.round == 1 and state_hashes(held.dense) == want
    from fedhl.data import load_examples
    from fedhl.jobspec import JobSpec
    from fedhl.simulation import SimClient, simulate

    ranks = job_spec["rank_policy"]["fixed"]
    clients = [SimClient(f"agent-{i}", ranks[f"agent-{i}"], load_examples(p, "seq_cls", 2)) for i, p in enumerate(data)]
    sim_state, _ = simulate(JobSpec.model_validate(job_spec), clients, [])
    for m, w in load_state(final).dense.items():  # thread counts differ: float32 training, not bits
        torch.testing.assert_close(sim_state.dense[m], w, rtol=1e-5, atol=2e-6, msg=m)
