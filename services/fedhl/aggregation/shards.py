"""Shard results in the blob store (layout: `fedhl.codec`), and their assembly into the
round's new state and next-round artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..codec import ShardResult, load_shard, save_shard
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


def assemble(parts: list[ShardResult]) -> tuple[GlobalState, dict[str, Spectrum], dict[int, ClientStart]]:
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
