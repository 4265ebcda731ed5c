"""Aggregation strategies, one per module, and a registry to build them by name."""

from __future__ import annotations

from typing import Any, TypeVar

from ..defence import ClipConfig
from ..scaling import LoRAScaling, ScaleRule
from ..svd import SVDConfig
from ..weights import WeightConfig
from .base import ModuleStream, RoundPlan, Strategy, module_seed, uniform_ranks
from .factored import FedIT, HetLoRA, ZeroPadding, hetlora_pruned_rank, hetlora_tail_penalty
from .fedhl import FedHL
from .flexlora import FlexLoRA
from .flora import FLoRA

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedHL, FlexLoRA, FLoRA, HetLoRA, ZeroPadding, FedIT)}

WEIGHT_PRESETS: dict[str, WeightConfig] = {
    "default": WeightConfig(),
    "paper-literal": WeightConfig.paper_literal(),
    "uniform": WeightConfig(rule="uniform"),  # the cap binds only the non-LoRA parameters here
    "data-size": WeightConfig(rule="data_size"),
}


C = TypeVar("C", SVDConfig, WeightConfig, ClipConfig)


def _config(cls: type[C], value: object, what: str) -> C:
    """A config object from itself or a dict of its fields, with a ValueError naming the option."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping of {cls.__name__} fields, got {type(value).__name__}")
    try:
        return cls(**value)
    except TypeError as e:
        raise ValueError(f"{what}: {e}") from None


def build_strategy(
    name: str,
    *,
    alpha: float,
    scale_rule: ScaleRule = "standard",
    weights: str | WeightConfig | dict[str, Any] | None = None,
    svd: SVDConfig | dict[str, Any] | None = None,
    clip: str | ClipConfig | dict[str, Any] | None = None,
    **options: Any,
) -> Strategy:
    """Build a strategy from plain options (as a job config or CLI holds them).

    `weights` (FedHL only) is a preset name ('default', 'paper-literal', 'uniform',
    'data-size'), a `WeightConfig`, or a dict of its fields. `clip` (every strategy) is
    'off', a `ClipConfig`, or a dict of its fields (`k`, `action`); None: the default bound.
    The baselines take `max_weight_ratio` directly; FedHL inside `weights`. Every strategy
    takes `size_k` (the bound on reported sizes, core/defence.py; None: off).
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}") from None
    scaling = LoRAScaling(alpha, scale_rule)
    svd_cfg = _config(SVDConfig, svd, "svd") if svd is not None else None
    if weights is not None:
        if cls is not FedHL:
            raise ValueError(f"weight options apply to 'fedhl' only, not {name!r}")
        if isinstance(weights, str):
            if weights not in WEIGHT_PRESETS:
                raise ValueError(f"unknown weight preset {weights!r}; choose from {sorted(WEIGHT_PRESETS)}")
            weights = WEIGHT_PRESETS[weights]
        options["weights"] = _config(WeightConfig, weights, "weights")
    if clip is not None:
        options["clip"] = ClipConfig.off() if clip == "off" else _config(ClipConfig, clip, "clip")
    try:
        return cls(scaling, svd=svd_cfg, **options)
    except TypeError as e:  # an option this strategy does not take
        raise ValueError(f"strategy {name!r}: {e}") from None


__all__ = [
    "STRATEGIES",
    "WEIGHT_PRESETS",
    "FLoRA",
    "FedHL",
    "FedIT",
    "FlexLoRA",
    "HetLoRA",
    "ModuleStream",
    "RoundPlan",
    "Strategy",
    "ZeroPadding",
    "build_strategy",
    "hetlora_pruned_rank",
    "hetlora_tail_penalty",
    "module_seed",
    "uniform_ranks",
]
