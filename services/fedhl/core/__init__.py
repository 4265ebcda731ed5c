"""`fedhl.core`: the aggregation math, pure torch, no I/O.

from fedhl.core import build_strategy, uniform_ranks, ClientUpdate
strategy = build_strategy("fedhl", alpha=16)
state = strategy.init_state({"q": (4096, 4096)})
plan = strategy.plan_round(state, {"a": {"q": 8}, "b": {"q": 32}})
start = strategy.client_start(state, plan, "a")            # ClientStart.factors["q"]
state, report = strategy.aggregate(state, plan, [ClientUpdate("a", {...}, n_examples=100), ...])
"""

from .defence import ClipConfig, clip_bound, lower_median
from .merge import (
    average_padded,
    lowrank_fro_sq,
    pad_factors,
    stack_factors,
    start_factors,
    truncation_factors,
    weighted_product_sum,
)
from .scaling import LoRAScaling
from .strategies import (
    STRATEGIES,
    WEIGHT_PRESETS,
    FedHL,
    FedIT,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    ModuleStream,
    RoundPlan,
    Strategy,
    ZeroPadding,
    build_strategy,
    hetlora_pruned_rank,
    hetlora_tail_penalty,
    uniform_ranks,
)
from .svd import Spectrum, SVDConfig, partial_svd
from .types import (
    AggregationError,
    AggregationReport,
    ClientStart,
    ClientUpdate,
    ClipRecord,
    DropRecord,
    GlobalState,
    LoRAFactors,
    SizeRecord,
    UploadError,
)
from .weights import (
    WeightConfig,
    cap_weights,
    capped_data_size_weights,
    data_size_weights,
    drift_weights,
    effective_participants,
)

__all__ = [
    "STRATEGIES",
    "WEIGHT_PRESETS",
    "AggregationError",
    "AggregationReport",
    "ClientStart",
    "ClientUpdate",
    "ClipConfig",
    "ClipRecord",
    "DropRecord",
    "FLoRA",
    "FedHL",
    "FedIT",
    "FlexLoRA",
    "GlobalState",
    "HetLoRA",
    "LoRAFactors",
    "LoRAScaling",
    "ModuleStream",
    "RoundPlan",
    "SVDConfig",
    "SizeRecord",
    "Spectrum",
    "Strategy",
    "UploadError",
    "WeightConfig",
    "ZeroPadding",
    "average_padded",
    "build_strategy",
    "cap_weights",
    "capped_data_size_weights",
    "clip_bound",
    "data_size_weights",
    "drift_weights",
    "effective_participants",
    "hetlora_pruned_rank",
    "hetlora_tail_penalty",
    "lower_median",
    "lowrank_fro_sq",
    "pad_factors",
    "partial_svd",
    "stack_factors",
    "start_factors",
    "truncation_factors",
    "uniform_ranks",
    "weighted_product_sum",
]
