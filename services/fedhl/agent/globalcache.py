"""The global update an agent holds per job under a factored downlink (FedHL's `full` view).

The agent keeps `W_v` of the last version it trained on, on disk (`<dir>/<job>.safetensors`,
the state layout of `fedhl.codec`). For a task at version `v` it receives its start package
(whose metadata names the sha256 of every module of `W_v`), then builds `W_v` the cheapest way
the coordinator offered — the version it holds, or a chain of round changes applied with
`core.downlink.rebuild` (a new agent starts from `W_0 = 0`) — and checks the hashes. When they
disagree (a corrupted or stale cache, a chain that does not fit) it downloads the dense state,
which must match them. Its frozen base then gets `W_v − s·B⁰A⁰` (`view_residual`)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..codec import (
    CodecError,
    PayloadError,
    StateFileError,
    StateReader,
    decode_change,
    decode_tensors,
    load_state,
    save_state,
)
from ..core import ClientStart, GlobalState, LoRAFactors, LoRAScaling
from ..core.downlink import DownlinkError, mismatched, rebuild, view_residual

log = logging.getLogger(__name__)
BlobRef = tuple[str, int, str]  # (key, size, name) as a task lists them
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Obtained:
    """The global update of one version, and how it was obtained."""

    round: int
    modules: dict[str, Tensor]  # module -> W_v (d_out, d_in), float32
    route: str  # "zeros" (version 0), "held", "chain" or "state" (dense download)
    mismatch: bool  # a held or rebuilt state disagreed with the hashes; the dense state was taken
    bytes: int  # downloaded to obtain it


class GlobalCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, job_id: str) -> Path:
        if not _SAFE.match(job_id):
            raise ValueError(f"job id {job_id!r} is not a safe file name")
        return self.root / f"{job_id}.safetensors"

    def held(self) -> dict[str, int]:
        """Job id -> the version held (for the coordinator: what to send)."""
        out: dict[str, int] = {}
        for p in sorted(self.root.glob("*.safetensors")) if self.root.exists() else []:
            try:
                out[p.stem] = StateReader(p).round
            except StateFileError:
                continue
        return out

    def load(self, job_id: str) -> tuple[int, dict[str, Tensor]] | None:
        path = self._path(job_id)
        if not path.exists():
            return None
        try:
            st = load_state(path)
        except (CodecError, OSError) as e:
            log.warning("held global update of job %s is unreadable (%s); ignoring it", job_id, e)
            return None
        return st.round, st.dense

    def store(self, job_id: str, round_: int, modules: Mapping[str, Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(job_id)
        tmp = path.with_suffix(".tmp")
        save_state(GlobalState(round=round_, dense=dict(modules)), tmp)
        os.replace(tmp, path)

    def obtain(
        self,
        job_id: str,
        round_: int,
        hashes: Mapping[str, str],
        shapes: Mapping[str, tuple[int, int]],
        blobs: Sequence[BlobRef],
        fetch: Callable[[str], bytes],
    ) -> Obtained:
        """W_round, checked against `hashes`, and stored as the held version. Raises
        DownlinkError when even the dense state disagrees (or none was offered)."""
        changes = [k for k, _, name in blobs if name == "change"]
        state_key = next((k for k, _, name in blobs if name == "state"), None)
        held = self.load(job_id)
        candidate: dict[str, Tensor] | None = None
        route, got = "", 0
        if round_ == 0:
            candidate, route = {m: torch.zeros(s, dtype=torch.float32) for m, s in shapes.items()}, "zeros"
        elif held is not None and held[0] == round_ and not changes:
            candidate, route = held[1], "held"
        elif changes:
            candidate, got = self._chain(changes, fetch, held, shapes, round_)
            route = "chain"
        mismatch = candidate is not None and bool(mismatched(candidate, hashes))
        if candidate is None or mismatch:
            if state_key is None:
                raise DownlinkError(f"job {job_id} version {round_}: no dense state offered and nothing held fits")
            data = fetch(state_key)
            got += len(data)
            tensors = decode_tensors(data)
            candidate = {k[len("dense::") :]: v for k, v in tensors.items() if k.startswith("dense::")}
            route = "state"
            bad = mismatched(candidate, hashes)
            if bad:
                raise DownlinkError(
                    f"job {job_id} version {round_}: the dense state disagrees with its hashes on {bad[:3]}"
                )
        if mismatch:
            log.warning(
                "job %s version %d: rebuilt global update disagreed with its hashes; took the dense state",
                job_id,
                round_,
            )
        self.store(job_id, round_, candidate)
        return Obtained(round_, candidate, route, mismatch, got)

    @staticmethod
    def _chain(
        keys: Sequence[str],
        fetch: Callable[[str], bytes],
        held: tuple[int, dict[str, Tensor]] | None,
        shapes: Mapping[str, tuple[int, int]],
        round_: int,
    ) -> tuple[dict[str, Tensor] | None, int]:
        got, chain = 0, []
        for k in keys:
            data = fetch(k)
            got += len(data)
            try:
                chain.append(decode_change(data))
            except PayloadError as e:
                log.warning("a change could not be read (%s); falling back to the dense state", e)
                return None, got
        first = chain[0].round
        if [c.round for c in chain] != list(range(first, round_ + 1)):
            return None, got
        if held is not None and held[0] == first - 1:
            base = held[1]
        elif first == 1:
            base = {m: torch.zeros(s, dtype=torch.float32) for m, s in shapes.items()}
        else:
            return None, got
        try:
            return rebuild(base, [c.changes for c in chain]), got
        except DownlinkError as e:
            log.warning("the chain of changes does not fit the held state (%s)", e)
            return None, got


def full_view_start(start: ClientStart, modules: Mapping[str, Tensor], scaling: LoRAScaling) -> ClientStart:
    """The start with the full view's base residuals `W_v − s·B⁰A⁰`, rebuilt locally."""
    residual: dict[str, Tensor | LoRAFactors] = {
        m: view_residual(modules[m], f, scaling.scale(f.rank)) for m, f in start.factors.items()
    }
    return ClientStart(start.factors, residual, start.extras)


def start_shapes(start: ClientStart) -> dict[str, tuple[int, int]]:
    return {m: f.shape for m, f in start.factors.items()}
