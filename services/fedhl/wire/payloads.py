"""Tensor payloads as safetensors bytes (never pickle).

An update (agent → server) holds `lora_B::<module>` (d_out, r), `lora_A::<module>` (r, d_in)
and `extra::<name>` for non-LoRA trainable parameters. A start package (server → agent) holds
the same keys plus `residual::<module>` (dense) or `residual_B::`/`residual_A::` (low rank,
scale 1) that the agent adds to its frozen base weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save
from torch import Tensor

from ..core.types import ClientStart, LoRAFactors

ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


class PayloadError(ValueError):
    """The payload is not what the assignment expects; the message says exactly why."""


@dataclass(frozen=True)
class Expected:
    """What one assignment's upload must contain."""

    shapes: Mapping[str, tuple[int, int]]  # module -> (d_out, d_in)
    rank: int
    extras: Mapping[str, tuple[int, ...]]

    def max_bytes(self) -> int:
        """Upper bound on a valid payload's size (fp32 values plus a generous header)."""
        values = sum(self.rank * (o + i) for o, i in self.shapes.values())
        values += sum(int(torch.Size(s).numel()) for s in self.extras.values())
        return 4 * values + 256 * (len(self.shapes) * 2 + len(self.extras)) + (64 << 10)


def encode_update(
    factors: Mapping[str, LoRAFactors],
    extras: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    tensors: dict[str, Tensor] = {}
    for m, f in factors.items():
        tensors[f"lora_B::{m}"] = f.B.detach().contiguous().cpu()
        tensors[f"lora_A::{m}"] = f.A.detach().contiguous().cpu()
    for k, v in (extras or {}).items():
        tensors[f"extra::{k}"] = v.detach().contiguous().cpu()
    return save(tensors, metadata=dict(metadata or {}))


def decode_file(path: str | Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise PayloadError(f"not a valid safetensors payload: {e}") from None


def decode_tensors(data: bytes) -> dict[str, Tensor]:
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PayloadError(f"not a valid safetensors payload: {e}") from None


def validate_update(tensors: Mapping[str, Tensor], exp: Expected) -> tuple[dict[str, LoRAFactors], dict[str, Tensor]]:
    """Check every module and extra is present with the assigned shapes, an allowed dtype and
    finite values; nothing else may be present."""
    expected_keys = {f"lora_{ab}::{m}" for m in exp.shapes for ab in "AB"} | {f"extra::{k}" for k in exp.extras}
    missing, unknown = expected_keys - set(tensors), set(tensors) - expected_keys
    if missing:
        raise PayloadError(f"missing tensors: {sorted(missing)[:5]}")
    if unknown:
        raise PayloadError(f"unexpected tensors: {sorted(unknown)[:5]}")
    for key, t in tensors.items():
        if t.dtype not in ALLOWED_DTYPES:
            raise PayloadError(f"{key}: dtype {t.dtype} not allowed (float32, float16, bfloat16)")
    factors: dict[str, LoRAFactors] = {}
    for m, (d_out, d_in) in exp.shapes.items():
        B, A = tensors[f"lora_B::{m}"], tensors[f"lora_A::{m}"]
        if tuple(B.shape) != (d_out, exp.rank) or tuple(A.shape) != (exp.rank, d_in):
            raise PayloadError(
                f"module {m}: expected B({d_out}, {exp.rank}) A({exp.rank}, {d_in}) for the "
                f"assigned rank, got B{tuple(B.shape)} A{tuple(A.shape)}"
            )
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise PayloadError(f"module {m}: factors contain NaN or Inf")
        factors[m] = LoRAFactors(B, A)
    extras: dict[str, Tensor] = {}
    for k, shape in exp.extras.items():
        t = tensors[f"extra::{k}"]
        if tuple(t.shape) != tuple(shape):
            raise PayloadError(f"extra {k}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise PayloadError(f"extra {k}: contains NaN or Inf")
        extras[k] = t
    return factors, extras


def encode_start(start: ClientStart, metadata: Mapping[str, str] | None = None) -> bytes:
    tensors: dict[str, Tensor] = {}
    for m, f in start.factors.items():
        tensors[f"lora_B::{m}"] = f.B.detach().contiguous().cpu().float()
        tensors[f"lora_A::{m}"] = f.A.detach().contiguous().cpu().float()
    for m, r in start.base_residual.items():
        if isinstance(r, Tensor):
            tensors[f"residual::{m}"] = r.detach().contiguous().cpu().float()
        else:
            tensors[f"residual_B::{m}"] = r.B.detach().contiguous().cpu().float()
            tensors[f"residual_A::{m}"] = r.A.detach().contiguous().cpu().float()
    for k, v in start.extras.items():
        tensors[f"extra::{k}"] = v.detach().contiguous().cpu()
    return save(tensors, metadata=dict(metadata or {}))


def decode_start(data: bytes) -> ClientStart:
    t = decode_tensors(data)
    factors: dict[str, LoRAFactors] = {}
    residual: dict[str, Tensor | LoRAFactors] = {}
    extras: dict[str, Tensor] = {}
    for key, v in t.items():
        kind, _, name = key.partition("::")
        if kind == "lora_B":
            factors[name] = LoRAFactors(v, t[f"lora_A::{name}"])
        elif kind == "residual":
            residual[name] = v
        elif kind == "residual_B":
            residual[name] = LoRAFactors(v, t[f"residual_A::{name}"])
        elif kind == "extra":
            extras[name] = v
        elif kind not in ("lora_A", "residual_A"):
            raise PayloadError(f"unexpected tensor {key!r} in start package")
    return ClientStart(factors, residual, extras)
