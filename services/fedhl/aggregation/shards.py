"""Shard results in the blob store (layout: `fedhl.codec`), and their assembly into the
round's new state and next-round artifacts: file to file, tensor by tensor."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import CHANGE_KEY
from ..codec import ShardResult, assemble_files, load_shard, save_shard
from ..core import ClientStart, GlobalState, Spectrum
from ..storage.blobs import BlobStore


def put_shard(blobs: BlobStore, res: ShardResult) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shard.safetensors"
        save_shard(res, path)
        return blobs.put_file(path)


def get_shard(blobs: BlobStore, key: str) -> ShardResult:
    with blobs.local_path(key) as path:
        return load_shard(path)


@dataclass(frozen=True)
class Published:
    """Keys of the round's new artifacts, and the shards' partial reports."""

    round: int
    state_key: str
    plan_key: str | None
    start_keys: dict[str, str]  # rank (str) -> start package key; CHANGE_KEY -> the change (factored downlink)
    reports: list[dict[str, Any]]
    sizes: dict[str, int]  # bytes: "state", "change" (factored downlink), "start:<rank>"


def publish(blobs: BlobStore, shard_keys: list[str], start_meta: Mapping[str, str]) -> Published:
    """Write the new state, the next round's spectra and the start packages from the stored
    shard results, never holding a whole state (`fedhl.codec.assemble_files`)."""
    with ExitStack() as stack:
        paths = [stack.enter_context(blobs.local_path(k)) for k in shard_keys]
        d = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        files = assemble_files(paths, d, start_meta)
        start_keys = {str(r): blobs.put_file(p) for r, p in sorted(files.starts.items())}
        sizes = {f"start:{r}": p.stat().st_size for r, p in sorted(files.starts.items())}
        sizes["state"] = files.state.stat().st_size
        if files.change is not None:
            start_keys[CHANGE_KEY] = blobs.put_file(files.change)
            sizes["change"] = files.change.stat().st_size
        return Published(
            files.round,
            blobs.put_file(files.state),
            blobs.put_file(files.spectra) if files.spectra else None,
            start_keys,
            files.reports,
            sizes,
        )


def assemble(parts: list[ShardResult]) -> tuple[GlobalState, dict[str, Spectrum], dict[int, ClientStart]]:
    """The round's state and next-round artifacts from shard results in memory (tests, tools)."""
    state = GlobalState(round=parts[0].state.round)
    spectra: dict[str, Spectrum] = {}
    starts: dict[int, ClientStart] = {}
    for p in parts:
        state.dense.update(p.state.dense)
        state.factors.update(p.state.factors)
        state.extras.update(p.state.extras)
        spectra.update(p.spectra)
        for r, st in p.starts.items():
            agg = starts.setdefault(r, ClientStart({}, {}, {}))
            agg.factors.update(st.factors)
            agg.base_residual.update(st.base_residual)
    return state, spectra, starts
