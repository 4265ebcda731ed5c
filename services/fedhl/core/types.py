"""Value types shared by every strategy. Pure data: no I/O, no service concepts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

ModuleName = str
ClientId = str
RankMap = Mapping[ModuleName, int]  # module -> LoRA rank for one client in one round
MAX_EXAMPLES = 2**63 - 1  # the largest n_examples a ClientUpdate accepts (int64, as stored)


class AggregationError(ValueError):
    """The round cannot be aggregated (bad upload, non-finite result, inconsistent plan)."""


class UploadError(AggregationError):
    """One client's upload does not match what the round assigned it."""

    def __init__(self, client_id: ClientId, reason: str, module: ModuleName | None = None):
        where = f"client {client_id!r}" + (f", module {module!r}" if module else "")
        super().__init__(f"{where}: {reason}")
        self.client_id = client_id
        self.module = module
        self.reason = reason


@dataclass(frozen=True)
class LoRAFactors:
    """One module's LoRA pair; its update is `scale · B @ A`."""

    B: Tensor  # (d_out, r)
    A: Tensor  # (r, d_in)

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2:
            raise ValueError(f"LoRA factors must be 2-D, got B{tuple(self.B.shape)} A{tuple(self.A.shape)}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"rank mismatch: B{tuple(self.B.shape)} has {self.B.shape[1]} columns, "
                f"A{tuple(self.A.shape)} has {self.A.shape[0]} rows"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the dense update, (d_out, d_in)."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LoRAFactors:
        """On `device`, in `dtype` (None: as they are); the same tensors when nothing changes."""
        return LoRAFactors(self.B.to(device=device, dtype=dtype), self.A.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after local training.

    `factors` may be a lazy mapping (e.g. backed by a safetensors file): strategies read one
    module at a time, so only one module's uploads need to be in memory at once.
    """

    client_id: ClientId
    factors: Mapping[ModuleName, LoRAFactors]  # trained (B', A') per module
    n_examples: int
    extras: Mapping[str, Tensor] = field(default_factory=dict)  # non-LoRA trainable params
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_examples <= 0:
            raise UploadError(self.client_id, f"n_examples must be positive, got {self.n_examples}")
        if self.n_examples > MAX_EXAMPLES:  # beyond int64 (and float-safe); weights are capped anyway
            raise UploadError(self.client_id, f"n_examples must be at most {MAX_EXAMPLES}, got {self.n_examples}")


@dataclass
class GlobalState:
    """The server-side model update between rounds.

    Dense strategies (FedHL, FlexLoRA, FLoRA) keep `dense[module] = W_t` (d_out, d_in) in
    effective-update space; factor strategies (HetLoRA, zero-padding, FedIT) keep
    `factors[module]` at the job's maximum rank. `extras` holds non-LoRA trainable
    parameters (e.g. a classification head) averaged by data size.
    """

    round: int = 0
    dense: dict[ModuleName, Tensor] = field(default_factory=dict)
    factors: dict[ModuleName, LoRAFactors] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def modules(self) -> list[ModuleName]:
        return list(self.dense) if self.dense else list(self.factors)

    def shape(self, module: ModuleName) -> tuple[int, int]:
        if module in self.dense:
            d_out, d_in = self.dense[module].shape
            return int(d_out), int(d_in)
        return self.factors[module].shape

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor view, for hashing, checkpoints and equality tests."""
        out: dict[str, Tensor] = {}
        for m, w in self.dense.items():
            out[f"dense::{m}"] = w
        for m, f in self.factors.items():
            out[f"lora_B::{m}"] = f.B
            out[f"lora_A::{m}"] = f.A
        for k, v in self.extras.items():
            out[f"extra::{k}"] = v
        return out


@dataclass(frozen=True)
class ClientStart:
    """Everything a client needs to start a round at its assigned ranks.

    `base_residual[module]` is added to the client's frozen base weight (FedHL's `full` and
    `residual:R` client views, FLoRA's merged global update); empty in the default view.
    A residual is either dense (d_out, d_in) or low-rank factors with scale 1.
    """

    factors: dict[ModuleName, LoRAFactors]
    base_residual: dict[ModuleName, Tensor | LoRAFactors] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def downlink_values(self) -> int:
        """Number of tensor values sent to the client (what the downlink costs)."""
        n = sum(f.B.numel() + f.A.numel() for f in self.factors.values())
        for r in self.base_residual.values():
            n += r.numel() if isinstance(r, Tensor) else r.B.numel() + r.A.numel()
        return n + sum(v.numel() for v in self.extras.values())


@dataclass(frozen=True)
class DropRecord:
    """One upload (or one module of it) left out of a round's merge, and why.

    `reason` is a short code (`non_finite_factors`, `non_finite_update`, `overflow`,
    `update_norm_above_bound`, `non_finite_extras`, `update_against_round`,
    `validation_loss_worse`); `detail` says it in words.
    `module` is a LoRA module name or `extra::<param>` for a non-LoRA parameter, or `*` for
    an upload left out whole (`validation_loss_worse`, the validation screen).
    """

    client: ClientId
    module: str
    reason: str
    detail: str = ""
    # `update_norm_above_bound` (the `reject` action) only: the norm and `k × median`
    norm: float | None = None
    bound: float | None = None
    # `update_against_round` (the direction screen) only: the update's cosine to the sum of
    # the other uploads' unit-normalised updates in that module
    cosine: float | None = None
    # `validation_loss_worse` (the validation screen) only: how much leaving the upload out
    # lowers the validation loss, `L(all) − L(all but it)`, and the round's threshold; under the
    # window rule the threshold is on `score`, the upload's summed evidence over the window
    effect: float | None = None
    threshold: float | None = None
    score: float | None = None


@dataclass(frozen=True)
class ClipRecord:
    """One update scaled down to the round's bound: `norm · scale == bound`."""

    client: ClientId
    module: str
    norm: float
    bound: float
    scale: float


@dataclass(frozen=True)
class SizeRecord:
    """One reported data size clamped to the round's bound (`size_k ×` the lower median of
    the round's reported sizes): the weights counted `bounded`, not `reported`."""

    client: ClientId
    reported: int
    bounded: float
    bound: float


@dataclass
class AggregationReport:
    """What a round's merge did, for logs, the REST API and experiments."""

    strategy: str
    round: int
    clients: list[ClientId]
    weights: dict[ClientId, float]  # scalar weight per client (mean over modules if per-module)
    truncation_errors: dict[ClientId, float]  # e_i = Σ_ℓ ‖W_t − trunc(W_t, r_i)‖²_F
    energy_kept: dict[int, float]  # rank -> fraction of ‖W_t‖²_F kept by trunc at that rank
    update_norms: dict[ClientId, float]  # ‖Δ_i‖_F over all modules
    global_update_norm: float  # ‖W_{t+1} − W_t‖_F (dense) or of the factor change
    n_eff: float  # 1 / Σ p_i²
    module_weights: dict[ModuleName, dict[ClientId, float]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    svd: dict[str, Any] = field(default_factory=dict)  # method, worst residual, seconds
    # what the defences did (core/defence.py): weights after caps and drops, times clip scales
    effective_weights: dict[ClientId, float] = field(default_factory=dict)
    dropped: list[DropRecord] = field(default_factory=list)
    clipped: list[ClipRecord] = field(default_factory=list)
    sizes_bounded: list[SizeRecord] = field(default_factory=list)
    # the direction screen's measurements: module (or `extra::<param>`) → client → cosine to the
    # others (core/defence.py cosines_to_others); in memory only (not in `to_dict`: modules ×
    # clients numbers a round), for experiments; what the screen did is in `dropped`
    cosines: dict[str, dict[ClientId, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view (no tensors, no NaN)."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "strategy": self.strategy,
            "round": self.round,
            "clients": list(self.clients),
            "weights": dict(self.weights),
            "truncation_errors": dict(self.truncation_errors),
            "energy_kept": {str(k): v for k, v in self.energy_kept.items()},
            "update_norms": dict(self.update_norms),
            "global_update_norm": clean(self.global_update_norm),
            "n_eff": self.n_eff,
            "module_weights": self.module_weights,
            "options": dict(self.options),
            "svd": dict(self.svd),
            "effective_weights": dict(self.effective_weights),
            "dropped": [asdict(d) for d in self.dropped],
            "clipped": [asdict(c) for c in self.clipped],
            "sizes_bounded": [asdict(r) for r in self.sizes_bounded],
        }
