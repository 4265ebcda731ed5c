"""What one hostile client does to an honest update, shared by bench/robustness.py (MiniLM) and
bench/robustness_mechanism.py (the known-optimum regression)."""

from __future__ import annotations

import dataclasses

import torch

from fedhl.core import ClientStart, ClientUpdate, LoRAFactors


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
