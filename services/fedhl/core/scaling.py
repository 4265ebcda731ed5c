"""LoRA scale conventions. The global state lives in effective-update space (`s·B@A`), so a
job records one convention and every edge converts with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScaleRule = Literal["standard", "rslora"]


@dataclass(frozen=True)
class LoRAScaling:
    """`s(r) = alpha / r` (standard LoRA) or `alpha / sqrt(r)` (rsLoRA)."""

    alpha: float
    rule: ScaleRule = "standard"

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"lora alpha must be a positive finite number, got {self.alpha}")
        if self.rule not in ("standard", "rslora"):
            raise ValueError(f"unknown scale rule {self.rule!r}; expected 'standard' or 'rslora'")

    def scale(self, rank: int) -> float:
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        return self.alpha / (math.sqrt(rank) if self.rule == "rslora" else rank)
