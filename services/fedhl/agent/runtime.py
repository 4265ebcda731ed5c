"""`fedhl agent`: the client agent installed on an edge GPU.

It enrols once (the enrolment token becomes a credential stored with 0600 permissions),
reports its device and measured throughput, long-polls for tasks, trains LoRA at the rank the
round assigns it on local data, uploads factors (resumable, sha256-checked), heartbeats while
it trains, stops a task the coordinator cancels, and rides out coordinator restarts with
exponential backoff. SIGTERM stops it cleanly.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from ..codec import decode_start, encode_update
from ..core.scaling import LoRAScaling
from ..data import Example, load_examples
from ..jobspec import TrainConfig
from ..modeling import load_base, verify_base
from ..settings import SettingsError
from .client import TLS, AgentClient, Resources, Task, retry_after_s
from .trainer import Cancelled, measure_throughput, prepare, train

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    coordinator: str
    data: Path
    token: str | None = None
    name: str = ""
    state_dir: Path = field(default_factory=lambda: Path.home() / ".fedhl-agent")
    device: str | None = None  # None: cuda when present
    memory_budget_bytes: int = 0
    base_model: str | None = None  # local path overriding the job's base model reference
    tls: TLS | None = None
    wait_s: int = 10
    threads: int | None = None

    @classmethod
    def from_env(cls, **flags: Any) -> AgentConfig:
        """Flags win; `FEDHL_AGENT_*` environment variables fill the rest."""
        env = os.environ

        def get(key: str, default: Any = None) -> Any:
            value = flags.get(key)
            return value if value not in (None, "") else env.get(f"FEDHL_AGENT_{key.upper()}", default)

        coordinator, data = get("coordinator"), get("data")
        if not coordinator or not data:
            raise SettingsError("the agent needs --coordinator and --data (or FEDHL_AGENT_COORDINATOR/_DATA)")
        ca, cert, key = get("tls_ca"), get("tls_cert"), get("tls_key")
        tls = (
            TLS(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None)
            if (ca or cert)
            else None
        )
        return cls(
            coordinator=coordinator,
            data=Path(data),
            token=get("token"),
            name=get("name", "") or os.uname().nodename,
            state_dir=Path(get("state_dir", str(Path.home() / ".fedhl-agent"))),
            device=get("device"),
            memory_budget_bytes=int(get("memory_budget_bytes", 0) or 0),
            base_model=get("base_model"),
            tls=tls,
            threads=int(get("threads")) if get("threads") else None,
        )


def device_resources(device: str, budget: int, steps_per_second: float = 0.0) -> Resources:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return Resources("cuda", props.name, int(props.total_memory), budget, steps_per_second)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 0
    return Resources("cpu", os.uname().machine, int(total), budget, steps_per_second)


class Credentials:
    """`<state_dir>/credential.json`, readable by the owner only."""

    def __init__(self, state_dir: Path, coordinator: str) -> None:
        self.path = state_dir / "credential.json"
        self.coordinator = coordinator

    def load(self) -> tuple[str, str] | None:
        if not self.path.exists():
            return None
        doc = json.loads(self.path.read_text())
        if doc.get("coordinator") != self.coordinator:
            return None
        return str(doc["agent_id"]), str(doc["credential"])

    def save(self, agent_id: str, credential: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"coordinator": self.coordinator, "agent_id": agent_id, "credential": credential}, f)
            f.flush()
            os.fsync(f.fileno())  # the token was spent on this credential: it must survive a crash
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # and so must the rename
        finally:
            os.close(dir_fd)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.stop = threading.Event()
        self.cancel = threading.Event()
        self.task_started = threading.Event()  # wakes the heartbeat loop: a task heartbeats at once
        self.examples: dict[str, list[Example]] = {}
        self.bases: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.steps_per_second = 0.0
        self.task: Task | None = None
        self.progress = 0.0
        self.client = AgentClient(cfg.coordinator, tls=cfg.tls)

    # ---------------------------------------------------------------- lifecycle
    def shutdown(self) -> None:
        """Stop working (a running task stops at its next step) and wake the heartbeat loop."""
        self.stop.set()
        self.task_started.set()

    def enrol(self) -> str:
        creds = Credentials(self.cfg.state_dir, self.cfg.coordinator)
        known = creds.load()
        if known is not None:
            self.client.credential = known[1]
            return known[0]
        if not self.cfg.token:
            raise SettingsError("no stored credential for this coordinator: pass --token (an enrolment token)")
        agent_id, credential = self.client.register(self.cfg.token, self.cfg.name, self.resources())
        creds.save(agent_id, credential)
        log.info("enrolled as agent %s", agent_id)
        return agent_id

    def resources(self) -> Resources:
        return device_resources(self.device, self.cfg.memory_budget_bytes, self.steps_per_second)

    def run(self) -> None:
        """Work until stopped; reconnect with exponential backoff when the coordinator is away."""
        backoff = 1.0
        agent_id = self._retrying(self.enrol)
        if agent_id is None:
            return
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        while not self.stop.is_set():
            try:
                # the long-poll length the server asked for (it lengthens with the fleet), else ours
                task = self.client.pull_task(self.client.pull_wait_s or self.cfg.wait_s)
                backoff = 1.0
                if task is not None:
                    self._run_task(task)
                elif self.client.retry_after_s > 0:
                    self.stop.wait(self.client.retry_after_s)  # the server asked for a pause
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("the coordinator refused this agent: %s", e.details())
                    raise SystemExit(2) from None
                pause = retry_after_s(e) or backoff  # a busy server says when to come back
                log.warning("coordinator unavailable (%s); retrying in %.0fs", e.code().name, pause)
                self.stop.wait(pause)
                backoff = min(backoff * 2, 30.0)
        log.info("agent stopped")

    def _retrying(self, fn: Any) -> Any:
        backoff = 1.0
        while not self.stop.is_set():
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise SystemExit(f"enrolment refused: {e.details()}") from None
                log.warning("coordinator unavailable (%s); retrying in %.0fs", e.code().name, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        return None

    def _heartbeats(self) -> None:
        while not self.stop.is_set():
            task = self.task
            try:
                action = self.client.heartbeat(self.resources(), task.task_id if task else "", self.progress)
                if action == "CANCEL_TASK" and task is not None:
                    log.warning("the coordinator cancelled task %s", task.task_id)
                    self.cancel.set()
            except grpc.RpcError:
                pass  # the main loop handles reconnection
            # as often as the server asks (an idle agent's open PullTask keeps it alive too);
            # a task that starts is reported at once
            self.task_started.wait(self.client.heartbeat_interval_s)
            self.task_started.clear()

    # ---------------------------------------------------------------- one task
    def _base(self, task: Task, num_labels: int, seed: int) -> tuple[Any, Any]:
        path = self.cfg.base_model or task.base_model
        key = (path, task.task_type, num_labels)
        if key not in self.bases:
            if task.base_model_sha256:
                verify_base(path, task.base_model_sha256)  # refuse a model that is not the job's
            model, tok = load_base(path, task.task_type, num_labels, self.device, init_seed=seed)
            self.bases[key] = (model, tok)
            self.steps_per_second = measure_throughput(copy.deepcopy(model), tok, 8, 64, self.device)
        return self.bases[key]

    def _data(self, task_type: str, num_labels: int) -> list[Example]:
        if task_type not in self.examples:
            self.examples[task_type] = load_examples(self.cfg.data, task_type, num_labels)
        return self.examples[task_type]

    def _run_task(self, task: Task) -> None:
        t0 = time.monotonic()
        self.task, self.progress = task, 0.0
        self.cancel.clear()
        self.task_started.set()
        cfg = task.train_config
        num_labels = int(cfg.get("num_labels", 2))
        train_cfg = TrainConfig.model_validate({k: v for k, v in cfg.items() if k in TrainConfig.model_fields})
        try:
            if task.expired:  # e.g. pulled just before the deadline: the upload would be refused
                log.warning("task %s: the round's deadline has passed; skipping it", task.task_id)
                return
            examples = self._data(task.task_type, num_labels)
            start = decode_start(self.client.download(task.blobs[0][0]))
            base, tok = self._base(task, num_labels, int(cfg.get("seed", 0)))
            model = prepare(
                copy.deepcopy(base),
                start,
                list(start.factors),
                task.ranks,
                LoRAScaling(task.lora_alpha, task.scale_rule),  # type: ignore[arg-type]
                head_params=list(start.extras),
            )
            t_ready = time.monotonic()

            def progress(step: int, total: int, loss: float) -> None:
                self.progress = step / max(total, 1)
                if step == total or step % max(1, total // 4) == 0:
                    log.info(
                        "task %s round %d rank %d: step %d/%d loss %.4f",
                        task.task_id[:8],
                        task.round,
                        task.rank,
                        step,
                        total,
                        loss,
                    )

            stop_both = _Either(self.stop, self.cancel)
            result = train(
                model,
                tok,
                examples,
                train_cfg,
                task.task_type,
                self.device,
                seed=int(cfg.get("seed", 0)) * 100_003 + task.round,
                progress=progress,
                stop=stop_both,
            )
            t_train = time.monotonic()
            if task.expired:
                log.warning("task %s: trained past the round's deadline; not uploading", task.task_id)
                return
            payload = encode_update(result.factors, result.extras)
            metrics = {**result.metrics, "prepare_s": t_ready - t0, "train_s": t_train - t_ready}
            self.client.upload(task, payload, result.n_examples, metrics)
            log.info(
                "task %s round %d: uploaded %d bytes (train %.1fs, total %.1fs)",
                task.task_id[:8],
                task.round,
                len(payload),
                t_train - t_ready,
                time.monotonic() - t0,
            )
        except Cancelled:
            log.warning("task %s cancelled", task.task_id)
        except grpc.RpcError as e:
            if e.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                log.warning("upload of task %s refused: %s", task.task_id, e.details())
            else:
                raise
        finally:
            self.task, self.progress = None, 0.0


class _Either(threading.Event):
    """Set when either of two events is set (training stops on SIGTERM or on cancel)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        super().__init__()
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


def serve_agent(cfg: AgentConfig) -> None:
    agent = Agent(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.shutdown())
    try:
        agent.run()
    finally:
        agent.client.close()
    sys.stdout.flush()
