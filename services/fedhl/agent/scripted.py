"""A scripted agent with no ML: it returns its start factors (optionally perturbed) at the
assigned shapes. Drives the control plane in tests and in bench/control_plane.py."""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass

import grpc
import torch

from ..codec import decode_start, encode_update
from ..core import LoRAFactors
from .client import AgentClient, Resources, Task, retry_after_s


@dataclass
class ScriptedAgent:
    address: str
    token: str
    name: str
    n_examples: int = 100
    noise: float = 0.0  # 0: return the start factors unchanged (a no-op client)
    resources: Resources | None = None
    seed: int = 0
    delay_s: float = 0.0  # simulated training time

    def __post_init__(self) -> None:
        self.client = AgentClient(self.address)
        self.agent_id, self.credential = self.client.register(self.token, self.name, self.resources)
        self.rounds_done: list[int] = []
        self.errors: list[str] = []

    def train(self, task: Task, start_bytes: bytes) -> bytes:
        start = decode_start(start_bytes)
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{task.round}:{self.name}".encode()))
        factors = {}
        for m, f in start.factors.items():
            B, A = f.B.clone(), f.A.clone()
            if self.noise:
                B += self.noise * torch.randn(B.shape, generator=g)
                A += self.noise * torch.randn(A.shape, generator=g)
            factors[m] = LoRAFactors(B, A)
        extras = {k: v.clone() for k, v in start.extras.items()}
        return encode_update(factors, extras)

    def run_once(self, wait_s: int = 5) -> bool:
        task = self.client.pull_task(wait_s)
        if task is None:
            return False
        start = self.client.download(task.blobs[0][0])
        payload = self.train(task, start)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.client.upload(task, payload, self.n_examples, {"loss": 1.0})
        self.rounds_done.append(task.round)
        return True

    def run(self, stop: threading.Event, wait_s: int = 2) -> None:
        """Work until stopped; ride out coordinator restarts and rejected uploads. Heartbeats
        as often as the server asks, and pauses between pulls when it asks to."""
        next_beat = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    self.client.heartbeat(self.resources)
                    next_beat = time.monotonic() + self.client.heartbeat_interval_s
                if not self.run_once(wait_s) and self.client.retry_after_s > 0:
                    stop.wait(self.client.retry_after_s)
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")
                stop.wait(retry_after_s(e) or 0.5)

    def close(self) -> None:
        self.client.close()
