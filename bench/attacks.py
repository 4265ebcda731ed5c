"""What one hostile client does to an honest update, shared by bench/robustness.py (MiniLM) and
bench/robustness_mechanism.py (the known-optimum regression)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from fedhl.core import ClientStart, ClientUpdate, LoRAFactors
from fedhl.core.types import UploadError
from fedhl.jobspec import DefenceConfig, JobSpec

# the job's defence block with every bound off (the sizes and factors still meet the core's checks)
DEFENCE_OFF = {
    "clip_k": None,
    "max_weight_ratio": 1e6,
    "max_examples_per_agent": 2**63 - 1,
    "size_k": None,
    "min_cosine": None,
}
# claimed sizes: "bound" is the default max_examples_per_agent, whatever the run's job says
SIZES: dict[str, int | str] = {
    "size_above_bound": "bound+1",
    "size_at_bound": "bound",
    "size_1e12": 10**12,
    "size_2p64": 2**64 - 1,
}
Tamper = Callable[[int, ClientStart, ClientUpdate], ClientUpdate | None]


def scaled(start: ClientStart, upd: ClientUpdate, k: float) -> ClientUpdate:
    """The update's change from its start factors, times k (×1000: an outlier; −1: a sign flip)."""
    out = {}
    for m, f in upd.factors.items():
        s = start.factors[m]
        out[m] = LoRAFactors(s.B + k * (f.B - s.B), s.A + k * (f.A - s.A))
    return dataclasses.replace(upd, factors=out)


def huge(upd: ClientUpdate, value: float = 1e20) -> ClientUpdate:
    """Every factor entry set to `value`: finite, but the merge overflows without a bound."""
    factors = {m: LoRAFactors(torch.full_like(f.B, value), torch.full_like(f.A, value)) for m, f in upd.factors.items()}
    return dataclasses.replace(upd, factors=factors)


def tamperer(attack: str, spec: JobSpec, defence: bool, hostile: str) -> Tamper:
    """The hostile client's rewrite of its own upload (None: the upload is refused at the edge)."""
    bound = spec.defence.max_examples_per_agent  # what the edge accepts in this setting
    default = DefenceConfig().max_examples_per_agent  # the sizes are set against the default bound
    previous: dict[str, dict[str, LoRAFactors]] = {}

    def size(upd: ClientUpdate, claimed: int | str) -> ClientUpdate | None:
        n = {"bound+1": default + 1, "bound": default}.get(str(claimed), claimed)
        assert isinstance(n, int)
        if defence and n > bound:
            return None  # the coordinator's edge: INVALID_ARGUMENT, nothing stored
        try:
            return dataclasses.replace(upd, n_examples=n)
        except UploadError:
            return None  # beyond int64: refused by the core (and the edge) whatever the job says

    def tamper(round_: int, start: ClientStart, upd: ClientUpdate) -> ClientUpdate | None:
        if upd.client_id != hostile or attack == "clean":
            return upd
        if attack in SIZES:
            return size(upd, SIZES[attack])
        if attack == "factors_1e20":
            return huge(upd)
        if attack == "scale_x1000":
            return scaled(start, upd, 1000.0)
        if attack == "sign_flip":
            return scaled(start, upd, -1.0)
        if attack == "sign_flip_at_bound":
            flipped = size(scaled(start, upd, -1.0), "bound")
            assert flipped is not None
            return flipped
        if attack == "stale":
            old, previous["factors"] = previous.get("factors"), dict(upd.factors)
            return upd if old is None else dataclasses.replace(upd, factors=old)
        raise ValueError(f"unknown attack {attack!r}")

    return tamper
