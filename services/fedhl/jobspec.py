"""A federated job's specification, validated once at creation (REST → 422 with the field)."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .core import WEIGHT_PRESETS, Strategy, WeightConfig, build_strategy
from .core.defence import (
    MIN_COSINE,
    SIZE_K,
    VALIDATION_CAP,
    VALIDATION_K,
    VALIDATION_MARGIN,
    VALIDATION_SCORE,
    VALIDATION_WINDOW,
)

INT64_MAX = 2**63 - 1  # the largest integer the database stores; the wire's uint64 goes beyond it

# Bounds: every field has one, so a spec is either valid or a 422, never a 500 or an absurd
# allocation. A dimension up to 2^20, a rank up to 4096, at most 2^31 trainable parameters.
MAX_DIM = 1 << 20
MAX_RANK = 4096
MAX_MODULES = 10_000
MAX_TRAINABLE = 1 << 31
MAX_SEED = 2**63 - 1
Name = Annotated[str, Field(min_length=1, max_length=500)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(Strict):
    local_steps: int | None = Field(default=10, ge=1, le=1_000_000)
    local_epochs: float | None = Field(default=None, gt=0, le=1000)
    lr: float = Field(default=5e-4, gt=0, le=10)
    head_lr: float | None = Field(default=None, gt=0, le=10)  # classification head, if trainable
    batch_size: int = Field(default=16, ge=1, le=65536)
    max_seq_len: int = Field(default=128, ge=8, le=131072)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    hetlora_gamma: float | None = Field(default=None, gt=0, lt=1)  # HetLoRA self-pruning
    hetlora_lambda: float = Field(default=0.0, ge=0, le=1e6)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.local_epochs is not None:
            self.local_steps = None
        if self.local_steps is None and self.local_epochs is None:
            raise ValueError("set local_steps or local_epochs")
        return self


class SelectionConfig(Strict):
    fraction: float | None = Field(default=None, gt=0, le=1)  # of the available agents
    count: int | None = Field(default=None, ge=1, le=1_000_000)
    min_clients: int = Field(default=1, ge=1, le=1_000_000)
    over_selection: float = Field(default=1.0, ge=1, le=3)  # select ×this many, close at the target
    deadline_s: float = Field(default=600, gt=0, le=7 * 86400)
    quorum: float = Field(default=0.5, gt=0, le=1)  # fraction of the target that must report

    @model_validator(mode="after")
    def _one_of(self) -> SelectionConfig:
        if self.fraction is not None and self.count is not None:
            raise ValueError("set selection.fraction or selection.count, not both")
        if self.count is not None and self.count < self.min_clients:
            raise ValueError("selection.count must be at least min_clients")
        return self


class RankPolicy(Strict):
    kind: Literal["fixed", "capacity", "random"] = "capacity"
    fixed: dict[Name, Rank] = Field(default_factory=dict, max_length=100_000)  # agent id or name -> rank
    default_rank: int | None = Field(default=None, ge=1, le=MAX_RANK)  # fixed: agents not in the map
    seed: int = Field(default=0, ge=0, le=MAX_SEED)  # random
    # capacity: memory needed at rank r = base_bytes + activation_bytes + 16 B × r × Σ(d_in + d_out)
    # (fp32 factor, gradient, two Adam moments); throughput caps r at rank_per_step_per_s × steps/s.
    base_model_bytes: int = Field(default=0, ge=0, le=1 << 50)
    activation_bytes: int = Field(default=0, ge=0, le=1 << 50)
    rank_per_step_per_s: float | None = Field(default=None, gt=0, le=1e9)


class EvaluationConfig(Strict):
    path: str | None = Field(default=None, min_length=1, max_length=4096)  # held-out split (JSONL/CSV), server-side
    every: int = Field(default=1, ge=1, le=100_000)


class ValidationScreenConfig(Strict):
    """The validation screen (aggregation/validate.py): before a round's merge is committed,
    each upload's leave-one-out effect on the loss over a labelled split the *server* holds;
    an upload whose effects over the job's last `window` rounds add up to clear harm (in
    multiples of each round's median |effect|) and that raises the loss this round is left out
    (never with fewer than 3 uploads, never half the round; `window: 1`: one round's effect
    above `max(margin, k × the round's median |effect|)`).
    Needs server-side data, so it is off unless a path is given; keep the split apart from
    `evaluation.path` (screening on the data the accuracy is reported on would leak it into
    the figure). The aggregation then runs in one task per round (no module shards): the screen
    needs the whole model."""

    # labelled split (JSONL/CSV) on the aggregation workers' file system; the first max_examples rows
    path: str = Field(min_length=1, max_length=4096)
    max_examples: int = Field(default=256, ge=1, le=10_000)  # each upload costs one forward pass over them
    margin: float = Field(default=VALIDATION_MARGIN, ge=0, le=1e6)  # loss units (mean per example / token)
    k: float = Field(default=VALIDATION_K, ge=1, le=1e6)  # the one-round rule's (window: 1)
    # the window rule (core/defence.py validation_window_outliers): an upload is left out when its
    # effects over the job's last `window` rounds, each in multiples of its round's median |effect|
    # and counted within ±cap, sum to more than `score`, and it raises the loss this round by more
    # than `margin`; window 1: the one-round rule, `max(margin, k × median)`, as before
    window: int = Field(default=VALIDATION_WINDOW, ge=1, le=100)
    score: float = Field(default=VALIDATION_SCORE, ge=0, le=1e6)
    cap: float = Field(default=VALIDATION_CAP, gt=0, le=1e6)
    # what leaving an upload out takes away when its effect is measured: "upload", everything it
    # contributes (LoRA modules and non-LoRA parameters such as a head); "adapters", its LoRA
    # modules only, the non-LoRA parameters staying as merged from every upload (a small head
    # follows each agent's label skew, and that honest spread can hide an adapter's harm). A
    # leave-out always leaves out the whole upload.
    scope: Literal["upload", "adapters"] = "adapters"
    act: bool = True  # False: measure and report the effects (both scopes), never leave out


class DefenceConfig(Strict):
    """What bounds one agent's influence (core/defence.py; README "Hostile agents")."""

    # server-side bound on a client-reported data size: uploads above it are refused at the edge
    max_examples_per_agent: int = Field(default=1_000_000, ge=1, le=INT64_MAX)
    # optional admin-set size per agent (id or name): uploads claiming more are refused
    expected_examples: dict[Name, int] = Field(default_factory=dict, max_length=100_000)
    # update-size bound: k × the round's median update norm per module; None: off
    clip_k: float | None = Field(default=3.0, ge=1, le=1e6)
    clip_action: Literal["clip", "reject"] = "clip"
    # a reported n_examples counts at most size_k × the lower median of the round's reported
    # sizes (core/defence.py bounded_sizes), before any weight uses it; None: off
    size_k: float | None = Field(default=SIZE_K, ge=1, le=1e6)
    # the direction screen: per module, an upload whose update has a cosine below min_cosine to
    # the sum of the other uploads' unit-normalised updates is left out of that module
    # (core/defence.py; never in a round of fewer than 3, never half the round); -1: measure
    # and report only; None: off
    min_cosine: float | None = Field(default=MIN_COSINE, ge=-1, le=1)
    # the validation screen (each upload's effect on a server-held labelled split); None: off
    validation: ValidationScreenConfig | None = None
    # no client weighs more than max_weight_ratio / N; None: the strategy's default (4)
    max_weight_ratio: float | None = Field(default=None, ge=1, le=1e6)
    # an update above reject_k × median is left out whatever clip_action says, and only such
    # an update counts a strike among the bound's actions (an honest agent at a larger rank sits
    # above clip_k × median); None: no such limit, bound actions never count. Refused uploads
    # and dropped unsound ones always count.
    reject_k: float | None = Field(default=30.0, ge=1, le=1e6)  # honest MiniLM clips reached 9.4 × median
    # an agent with this many strikes since its last round without one is not selected for
    # quarantine_rounds rounds (0: never quarantined) or quarantine_s seconds, whichever ends
    # first, so a job whose min_clients needs the agent waits at most quarantine_s.
    # quarantine_s None: quarantine_rounds × selection.deadline_s (as long as those rounds may take)
    quarantine_after: int = Field(default=3, ge=1, le=1000)
    quarantine_rounds: int = Field(default=5, ge=0, le=100_000)
    quarantine_s: float | None = Field(default=None, gt=0, le=365 * 86400)

    @model_validator(mode="after")
    def _strike_above_clip(self) -> DefenceConfig:
        if self.reject_k is not None and self.clip_k is not None and self.reject_k < self.clip_k:
            raise ValueError(f"defence.reject_k ({self.reject_k:g}) must be at least clip_k ({self.clip_k:g})")
        return self

    def quarantine_window_s(self, deadline_s: float) -> float:
        """How long a quarantine lasts at most, in seconds."""
        return self.quarantine_s if self.quarantine_s is not None else self.quarantine_rounds * deadline_s

    @field_validator("expected_examples")
    @classmethod
    def _expected(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if not 1 <= n <= INT64_MAX}
        if bad:
            raise ValueError(f"expected_examples must be in [1, 2**63-1], got {bad}")
        return v

    def examples_bound(self, agent_id: str, agent_name: str) -> tuple[int, str]:
        """The most examples this agent may claim, and the field that sets it."""
        for key in (agent_id, agent_name):
            if key in self.expected_examples:
                n = min(self.expected_examples[key], self.max_examples_per_agent)
                return n, f"defence.expected_examples[{key!r}]"
        return self.max_examples_per_agent, "defence.max_examples_per_agent"


class JobSpec(Strict):
    name: str = Field(min_length=1, max_length=200)
    base_model: str = Field(min_length=1, max_length=500, description="local path or hub id")
    base_model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    task_type: Literal["seq_cls", "causal_lm"] = "seq_cls"
    num_labels: int = Field(default=2, ge=1, le=1_000_000)
    target_modules: list[Name] = Field(min_length=1, max_length=1000)
    module_shapes: dict[Name, tuple[Dim, Dim]] = Field(
        default_factory=dict,
        max_length=MAX_MODULES,
        description="module path -> (d_out, d_in); resolved from the model if empty",
    )
    extra_shapes: dict[Name, Annotated[list[Dim], Field(min_length=1, max_length=8)]] = Field(
        default_factory=dict,
        max_length=1000,
        description="non-LoRA trainable parameters (e.g. a classifier head)",
    )
    lora_alpha: float = Field(default=16.0, gt=0, le=1e6)
    scale_rule: Literal["standard", "rslora"] = "standard"
    rank_set: list[Rank] = Field(min_length=1, max_length=64)
    rank_policy: RankPolicy = Field(default_factory=RankPolicy)
    strategy: str = Field(default="fedhl", min_length=1, max_length=64)
    strategy_options: dict[Annotated[str, Field(max_length=64)], Any] = Field(default_factory=dict, max_length=64)
    rounds: int = Field(ge=1, le=100_000)
    train: TrainConfig = Field(default_factory=TrainConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    defence: DefenceConfig = Field(default_factory=DefenceConfig)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    @field_validator("rank_set")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if any(r < 1 for r in v):
            raise ValueError("ranks must be positive")
        return sorted(set(v))

    @field_validator("module_shapes")
    @classmethod
    def _shapes(cls, v: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        for m, (o, i) in v.items():
            if o < 1 or i < 1:
                raise ValueError(f"module {m}: dimensions must be positive")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        v = self.defence.validation
        if v is not None and self.evaluation.path is not None and v.path == self.evaluation.path:
            raise ValueError(
                "defence.validation.path is evaluation.path: screen on a split apart from the one the "
                "reported accuracy is measured on"
            )
        if self.module_shapes:
            for m in self.module_shapes:
                if not any(m == t or m.endswith("." + t) for t in self.target_modules):
                    raise ValueError(f"module_shapes has {m!r}, which matches no target_modules entry")
            trainable = max(self.rank_set) * sum(o + i for o, i in self.module_shapes.values())
            if trainable > MAX_TRAINABLE:
                raise ValueError(f"module_shapes × max(rank_set): {trainable} LoRA parameters, over {MAX_TRAINABLE}")
            smallest = min(min(s) for s in self.module_shapes.values())
            if max(self.rank_set) > smallest:
                raise ValueError(f"rank {max(self.rank_set)} exceeds the smallest module dimension {smallest}")
        extra = sum(math.prod(shape) for shape in self.extra_shapes.values())
        if extra > MAX_TRAINABLE:
            raise ValueError(f"extra_shapes make {extra} parameters (at most {MAX_TRAINABLE})")
        fixed = self.rank_policy.fixed
        bad = {k: r for k, r in fixed.items() if r not in self.rank_set}
        if bad:
            raise ValueError(f"rank_policy.fixed ranks {bad} are not in rank_set {self.rank_set}")
        if self.rank_policy.default_rank is not None and self.rank_policy.default_rank not in self.rank_set:
            raise ValueError("rank_policy.default_rank must be in rank_set")
        if self.strategy == "fedit" and len(self.rank_set) != 1:
            raise ValueError("strategy 'fedit' needs a single rank in rank_set (use 'zeropad' or 'hetlora')")
        for key, where in (
            ("clip", "defence.clip_k / defence.clip_action"),
            ("max_weight_ratio", "defence"),
            ("size_k", "defence"),
            ("min_cosine", "defence"),
        ):
            if key in self.strategy_options:
                raise ValueError(f"strategy_options.{key}: set it in the job's defence block ({where})")
        self.build_strategy()  # unknown strategy or options raise ValueError here → 422
        return self

    @property
    def factored_downlink(self) -> bool:
        """FedHL's `full` client view: agents rebuild the global update from each round's change."""
        return self.strategy == "fedhl" and self.strategy_options.get("client_view") == "full"

    def build_strategy(self) -> Strategy:
        options = dict(self.strategy_options)
        d = self.defence
        ratio = d.max_weight_ratio
        if ratio is not None:
            if self.strategy == "fedhl":  # FedHL keeps its cap inside its weight rule
                w = options.get("weights", "default")
                cfg = WEIGHT_PRESETS.get(w) if isinstance(w, str) else w
                if isinstance(cfg, dict):
                    try:
                        cfg = WeightConfig(**cfg)
                    except TypeError as e:
                        raise ValueError(f"strategy_options.weights: {e}") from None
                if not isinstance(cfg, WeightConfig):
                    raise ValueError(f"unknown weight preset {w!r}; choose from {sorted(WEIGHT_PRESETS)}")
                options["weights"] = dataclasses.replace(cfg, max_weight_ratio=ratio)
            else:
                options["max_weight_ratio"] = ratio
        clip: str | dict[str, Any] = (
            "off" if d.clip_k is None else {"k": d.clip_k, "action": d.clip_action, "reject_k": d.reject_k}
        )
        return build_strategy(
            self.strategy,
            alpha=self.lora_alpha,
            scale_rule=self.scale_rule,
            seed=self.seed,
            clip=clip,
            size_k=d.size_k,
            min_cosine=d.min_cosine,
            **options,
        )
