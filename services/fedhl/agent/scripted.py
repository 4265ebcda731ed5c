"""A scripted agent with no ML: it returns its start factors (optionally perturbed) at the
assigned shapes. Drives the control plane in tests and in bench/control_plane.py."""

from __future__ import annotations

import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from ..codec import decode_start, encode_update, start_hashes
from ..core import LoRAFactors
from .client import TLS, AgentClient, Resources, Task, retry_after_s
from .globalcache import GlobalCache, Obtained, start_shapes


def drift_direction(
    round_: int, module: str, b_shape: tuple[int, ...], a_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The change every drifting agent shares in `module` at `round_`: (d_out, r), (r, d_in)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"drift:{round_}:{module}".encode()))
    return torch.randn(b_shape, generator=g), torch.randn(a_shape, generator=g)


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
    # a change every agent with the same `drift` shares (seeded by round and module): agents that
    # agree on a direction, as trained ones do early on (`drift_direction`); 0: none
    drift: float = 0.0
    cache_dir: Path | None = None  # where it keeps the global update (full view); None: a temporary one
    tls: TLS | None = None  # None: plaintext (a coordinator on this machine)

    def __post_init__(self) -> None:
        self.client = AgentClient(self.address, tls=self.tls)
        self.agent_id, self.credential = self.client.register(self.token, self.name, self.resources)
        self.rounds_done: list[int] = []
        self.errors: list[str] = []
        self._tmp = tempfile.TemporaryDirectory() if self.cache_dir is None else None
        self.cache = GlobalCache(self.cache_dir or Path(self._tmp.name if self._tmp else "."))
        self.obtained: list[Obtained] = []  # full view: how each version's global update was obtained

    def train(self, task: Task, start_bytes: bytes) -> bytes:
        start = decode_start(start_bytes)
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{task.round}:{self.name}".encode()))
        factors = {}
        for m, f in start.factors.items():
            B, A = f.B.clone(), f.A.clone()
            if self.noise:
                B += self.noise * torch.randn(B.shape, generator=g)
                A += self.noise * torch.randn(A.shape, generator=g)
            if self.drift:
                dB, dA = drift_direction(task.round, m, tuple(B.shape), tuple(A.shape))
                B += self.drift * dB
                A += self.drift * dA
            factors[m] = LoRAFactors(B, A)
        extras = {k: v.clone() for k, v in start.extras.items()}
        return encode_update(factors, extras)

    def run_once(self, wait_s: int = 5) -> bool:
        task = self.client.pull_task(wait_s, self.cache.held())
        if task is None:
            return False
        start = self.client.download(task.blobs[0][0])
        hashes = start_hashes(start)
        if hashes is not None:  # full view: obtain and check the global update as `fedhl agent` does
            shapes = start_shapes(decode_start(start))
            self.obtained.append(
                self.cache.obtain(task.job_id, task.round, hashes, shapes, task.blobs[1:], self.client.download)
            )
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
        if self._tmp is not None:
            self._tmp.cleanup()
