"""Local LoRA training on the agent, with peft.

One round on a client:

    model, tok = load_base(path, task_type, num_labels)        # W0 (+ a head)
    peft_model = prepare(model, start, targets, rank, scaling, head_params)
    result = train(peft_model, tok, examples, cfg, task_type)  # (B', A') per module + head

`prepare` makes the client's model exactly `W0 + residual + s·B⁰A⁰` per target module
(ALGORITHMS.md, "What the client sees"), with the server's head values; `train` returns the
trained factors read back through peft's public `get_peft_model_state_dict` and the trained
head, so the server's merge `W0 + residual + s·B'A'` is the model the client ended with.

The head (non-LoRA trainable parameters, e.g. "classifier.weight") is made trainable by
setting `requires_grad` on its parameters after `get_peft_model`, not through peft's
`modules_to_save`: that option wraps the module in a `ModulesToSaveWrapper` holding a second
copy, renames its parameters ("classifier.modules_to_save.default.weight") and, for
`task_type="SEQ_CLS"`, adds "classifier"/"score" on its own. With plain `requires_grad` the
head keeps its base-model name, which is the name on the wire (`extra::classifier.weight`),
in the server state and in the export, and the LoRA config stays task-agnostic.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..core.scaling import LoRAScaling
from ..core.strategies.factored import hetlora_tail_penalty
from ..core.types import ClientStart, LoRAFactors
from ..data import Example, batches, encode_batch, summed_loss
from ..export import PEFT_KEY_PREFIX
from ..modeling import BaseModelMismatch, add_to_weights, linear, load_base, matches, set_parameters, verify_base

__all__ = [
    "BaseModelMismatch",
    "Cancelled",
    "TrainParams",
    "TrainResult",
    "compute_loss",
    "head_parameters",
    "load_base",
    "lora_layers",
    "measure_throughput",
    "prepare",
    "read_factors",
    "total_steps",
    "train",
    "verify_base",
]

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int, float], None]  # (step, total steps, task loss)


class Cancelled(RuntimeError):
    """Training stopped because the `stop` event was set."""


class TrainParams(Protocol):
    """The fields of `fedhl.jobspec.TrainConfig` that training reads."""

    @property
    def local_steps(self) -> int | None: ...
    @property
    def local_epochs(self) -> float | None: ...
    @property
    def lr(self) -> float: ...
    @property
    def head_lr(self) -> float | None: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def hetlora_gamma(self) -> float | None: ...
    @property
    def hetlora_lambda(self) -> float: ...


@dataclass(frozen=True)
class TrainResult:
    """What the agent uploads: trained factors per module (B (d_out, r), A (r, d_in), float32,
    CPU), the trained head, the example count and training metrics."""

    factors: dict[str, LoRAFactors]
    extras: dict[str, Tensor]
    n_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraPair:
    """One adapted module's trainable factors inside the peft model (the live parameters)."""

    A: torch.nn.Parameter  # (r, d_in)
    B: torch.nn.Parameter  # (d_out, r)
    scale: float


# --------------------------------------------------------------------------- peft helpers
def _peft_key(module: str, ab: str) -> str:
    """The key `get_peft_model_state_dict` uses: adapter name removed, base prefix kept."""
    return f"{PEFT_KEY_PREFIX}{module}.lora_{ab}.weight"


def lora_layers(peft_model: Any) -> dict[str, LoraPair]:
    """module path (in the base model) -> its active adapter's live (A, B) and scale."""
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    out: dict[str, LoraPair] = {}
    for name, mod in peft_model.get_base_model().named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            out[name] = LoraPair(mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, float(mod.scaling[adapter]))
    return out


def head_parameters(peft_model: Any) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters outside the LoRA factors, by their base-model name."""
    lora_ids = {id(p) for pair in lora_layers(peft_model).values() for p in (pair.A, pair.B)}
    return {
        n: p for n, p in peft_model.get_base_model().named_parameters() if p.requires_grad and id(p) not in lora_ids
    }


def read_factors(peft_model: Any, modules: Sequence[str] | None = None) -> dict[str, LoRAFactors]:
    """Factors per module through `get_peft_model_state_dict`, as float32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    names = list(modules) if modules is not None else list(lora_layers(peft_model))
    out: dict[str, LoRAFactors] = {}
    for m in names:
        kb, ka = _peft_key(m, "B"), _peft_key(m, "A")
        if kb not in state or ka not in state:
            raise KeyError(f"peft state dict has no {ka!r}/{kb!r}; keys look like {sorted(state)[:2]}")
        B = state[kb].detach().to("cpu", torch.float32).clone()  # (d_out, r)
        A = state[ka].detach().to("cpu", torch.float32).clone()  # (r, d_in)
        out[m] = LoRAFactors(B, A)
    return out


# --------------------------------------------------------------------------- prepare
def _module_ranks(start: ClientStart, rank: int | Mapping[str, int]) -> dict[str, int]:
    ranks = {m: rank for m in start.factors} if isinstance(rank, int) else dict(rank)
    if set(ranks) != set(start.factors):
        raise ValueError(f"rank map covers {sorted(ranks)}, the start package has factors for {sorted(start.factors)}")
    for m, f in start.factors.items():
        if f.rank != ranks[m]:
            raise ValueError(f"module {m!r}: start factors have rank {f.rank}, the assignment says {ranks[m]}")
    return ranks


def _check_start(model: torch.nn.Module, start: ClientStart, target_modules: Sequence[str]) -> None:
    from peft.tuners.lora import LoraLayer

    if not start.factors:
        raise ValueError("the start package has no LoRA factors")
    if hasattr(model, "peft_config") or any(isinstance(mod, LoraLayer) for mod in model.modules()):
        raise ValueError(
            "the model already carries LoRA layers (a previous round's prepare?); prepare() edits the "
            "base weights in place, so each round needs a fresh copy of the base model"
        )
    targeted = {n for n, _ in model.named_modules() if n and matches(n, list(target_modules))}
    if targeted != set(start.factors):
        missing, unknown = sorted(targeted - set(start.factors)), sorted(set(start.factors) - targeted)
        raise ValueError(
            f"start factors do not match target_modules {list(target_modules)}: "
            f"no factors for {missing[:5]}, factors for non-target modules {unknown[:5]}"
        )
    for m, f in start.factors.items():
        if not (bool(torch.isfinite(f.B).all()) and bool(torch.isfinite(f.A).all())):
            raise ValueError(f"module {m!r}: start factors contain NaN or Inf")
        lin = linear(model, m)
        if f.shape != (lin.out_features, lin.in_features):
            raise ValueError(
                f"module {m!r}: start factors give a {f.shape} update, the layer is "
                f"({lin.out_features}, {lin.in_features})"
            )
    for m, r in start.base_residual.items():
        if m not in start.factors:
            raise ValueError(f"base residual for {m!r}, which has no LoRA factors")
        shape = tuple(r.shape) if isinstance(r, Tensor) else r.shape
        if shape != start.factors[m].shape:
            raise ValueError(f"base residual for {m!r} has shape {shape}, expected {start.factors[m].shape}")


def _check_heads(model: torch.nn.Module, start: ClientStart, head_params: Sequence[str]) -> None:
    params = dict(model.named_parameters())
    for name in head_params:
        if name not in params:
            raise ValueError(f"head parameter {name!r} is not a parameter of the model")
        if any(name.startswith(m + ".") for m in start.factors):
            raise ValueError(f"head parameter {name!r} belongs to a LoRA target module")
    unknown = sorted(set(start.extras) - set(head_params))
    if unknown:
        raise ValueError(f"start package has extras {unknown} that are not head parameters {list(head_params)}")


def prepare(
    model: Any,
    start: ClientStart,
    target_modules: Sequence[str],
    rank: int | Mapping[str, int],
    scaling: LoRAScaling,
    head_params: Sequence[str] = (),
) -> Any:
    """Wrap `model` in a peft LoRA model at the start point of a round.

    `model` is modified in place (base weights, head, injected LoRA layers): load or copy a
    fresh base for every round; a model that already carries LoRA layers is refused.

    Per target module the effective weight becomes `W0 + residual + s(r)·B⁰A⁰`: the residual
    (dense, or low-rank factors with scale 1) is added to the frozen base weight, the start
    factors are loaded through `set_peft_model_state_dict`. `rank` is one rank for every
    module or a module -> rank map (modules off the main rank use peft's `rank_pattern`);
    every module's start factors must have its rank. `head_params` (full names, e.g.
    "classifier.weight") stay trainable and take the start package's `extras` values.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    _check_start(model, start, target_modules)
    ranks = _module_ranks(start, rank)
    _check_heads(model, start, head_params)

    for m, res in start.base_residual.items():  # one module at a time: one dense temporary
        add_to_weights(model, {m: res if isinstance(res, Tensor) else res.B @ res.A})  # (d_out, d_in)
    set_parameters(model, start.extras)

    modules = list(start.factors)
    r0 = max(set(ranks.values()), key=lambda r: (sum(v == r for v in ranks.values()), r))  # the most common
    config = LoraConfig(
        r=r0,
        lora_alpha=scaling.alpha,
        target_modules=modules,
        # peft matches rank_pattern keys as regexes against the module path
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r0},
        use_rslora=scaling.rule == "rslora",
        lora_dropout=0.0,
        bias="none",
        modules_to_save=None,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # peft's random init is overwritten below
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)

    layers = lora_layers(peft_model)
    if set(layers) != set(modules):
        raise RuntimeError(f"peft adapted {sorted(layers)[:5]}, expected {sorted(modules)[:5]}")
    for m, pair in layers.items():
        want = scaling.scale(ranks[m])
        if pair.A.shape[0] != ranks[m] or not math.isclose(pair.scale, want, rel_tol=1e-12):
            raise RuntimeError(
                f"peft built {m!r} at rank {pair.A.shape[0]} scale {pair.scale}, expected rank {ranks[m]} scale {want}"
            )

    state = {}
    for m, f in start.factors.items():
        state[_peft_key(m, "A")] = f.A  # (r, d_in)
        state[_peft_key(m, "B")] = f.B  # (d_out, r)
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise RuntimeError(f"peft did not accept the start factors: unexpected keys {result.unexpected_keys[:5]}")
    for m, f in read_factors(peft_model, modules).items():  # read back: the keys really landed
        dtype = layers[m].A.dtype
        if not (
            torch.equal(f.A.to(dtype), start.factors[m].A.to(dtype))
            and torch.equal(f.B.to(dtype), start.factors[m].B.to(dtype))
        ):
            raise RuntimeError(f"start factors for {m!r} did not load into the peft model")

    base = peft_model.get_base_model()
    for name in head_params:
        base.get_parameter(name).requires_grad_(True)
    missing = sorted(set(head_params) - set(start.extras))
    if missing:
        log.info("head parameters %s keep the base model's values (not in the start package)", missing)
    peft_model.eval()
    return peft_model


# --------------------------------------------------------------------------- training
def total_steps(cfg: TrainParams, n_examples: int) -> int:
    if cfg.local_steps is not None:
        return int(cfg.local_steps)
    if cfg.local_epochs is None:
        raise ValueError("set local_steps or local_epochs")
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.local_epochs * per_epoch))


def compute_loss(
    peft_model: Any,
    batch: Mapping[str, Tensor],
    task_type: str,
    hetlora: tuple[float, float] | None = None,
    layers: Mapping[str, LoraPair] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss to minimise, task loss, HetLoRA penalty or None) for one batch.

    Task loss: mean cross-entropy over the batch's targets (examples for seq_cls, response
    tokens for causal_lm). HetLoRA (gamma, lambda): `Σ_ℓ λ‖B_ℓ[:, ⌊γr⌋:]‖·‖A_ℓ[⌊γr⌋:]‖` added."""
    out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    total, count = summed_loss(out.logits, batch["labels"], task_type)
    task = total / max(count, 1)
    if hetlora is None or hetlora[1] == 0:
        return task, task, None
    gamma, lam = hetlora
    pairs = layers if layers is not None else lora_layers(peft_model)
    penalty = torch.stack([hetlora_tail_penalty(p.B, p.A, gamma, lam) for p in pairs.values()]).sum()
    return task + penalty.to(task.dtype), task, penalty


def train(
    peft_model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: TrainParams,
    task_type: str,
    device: torch.device | str = "cpu",
    seed: int = 0,
    hetlora: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train the LoRA factors and the head of a `prepare`d model; return what to upload.

    AdamW with one group for the LoRA factors (`cfg.lr`) and one for the head
    (`cfg.head_lr`, else `cfg.lr`); seeded shuffling and dropout, so a run is reproducible on
    CPU. `cfg.local_steps` steps, or `cfg.local_epochs` passes over the data. HetLoRA's
    regulariser is on when `hetlora` = (gamma, lambda) is given, else when
    `cfg.hetlora_gamma` is set and `cfg.hetlora_lambda` > 0. Setting `stop` makes the next
    step raise `Cancelled`. The model is left in eval mode, holding the trained weights."""
    if not examples:
        raise ValueError("no training examples")
    if hetlora is None and cfg.hetlora_gamma is not None and cfg.hetlora_lambda > 0:
        hetlora = (cfg.hetlora_gamma, cfg.hetlora_lambda)
    layers = lora_layers(peft_model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call prepare() first")
    heads = head_parameters(peft_model)
    for m, pair in layers.items():
        if not (pair.A.requires_grad and pair.B.requires_grad):
            raise ValueError(f"LoRA factors of {m!r} are frozen")
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    groups: list[dict[str, Any]] = [{"params": [p for pair in layers.values() for p in (pair.B, pair.A)], "lr": cfg.lr}]
    if heads:
        groups.append({"params": list(heads.values()), "lr": head_lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    n, steps = len(examples), total_steps(cfg, len(examples))
    shuffle = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    losses: list[float] = []
    penalty_last: float | None = None
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout
        peft_model.train()
        try:
            while len(losses) < steps:
                for idx in batches(n, cfg.batch_size, shuffle):
                    if stop is not None and stop.is_set():
                        raise Cancelled(f"training cancelled after {len(losses)} of {steps} steps")
                    batch = encode_batch(tokenizer, [examples[i] for i in idx], task_type, cfg.max_seq_len)
                    batch = {k: v.to(dev) for k, v in batch.items()}
                    loss, task, penalty = compute_loss(peft_model, batch, task_type, hetlora, layers)
                    if not bool(torch.isfinite(loss)):
                        raise FloatingPointError(f"training loss is {float(loss)} at step {len(losses) + 1}")
                    optimizer.zero_grad(set_to_none=True)
                    torch.autograd.backward(loss)
                    optimizer.step()
                    losses.append(float(task.detach()))
                    penalty_last = float(penalty.detach()) if penalty is not None else None
                    if progress is not None:
                        progress(len(losses), steps, losses[-1])
                    if len(losses) >= steps:
                        break
        finally:
            optimizer.zero_grad(set_to_none=True)
            peft_model.eval()
    seconds = time.perf_counter() - t0

    metrics = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_mean": sum(losses) / len(losses),
        "steps": float(len(losses)),
        "seconds": seconds,
        "steps_per_second": len(losses) / seconds if seconds > 0 else 0.0,
    }
    if penalty_last is not None:
        metrics["hetlora_penalty_last"] = penalty_last
    factors = read_factors(peft_model, list(layers))
    extras = {k: p.detach().to("cpu").clone() for k, p in heads.items()}
    return TrainResult(factors, extras, n, metrics)


# --------------------------------------------------------------------------- resources
def measure_throughput(
    model: Any, tokenizer: Any, batch_size: int, seq_len: int, device: torch.device | str = "cpu", steps: int = 2
) -> float:
    """Training steps per second (forward + backward of the trainable parameters) on a random
    batch of `batch_size × seq_len` tokens, after one untimed warm-up step. Gradients are
    cleared and the model's train/eval mode restored afterwards."""
    if batch_size < 1 or seq_len < 1 or steps < 1:
        raise ValueError("batch_size, seq_len and steps must be positive")
    dev = torch.device(device)
    vocab = min(len(tokenizer), int(getattr(model.config, "vocab_size", len(tokenizer))))
    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len) or seq_len))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(dev)  # (B, T)
    mask = torch.ones_like(ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training

    def step() -> None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        if trainable:
            logits.float().mean().backward()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model.train()
    try:
        with (
            torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
            torch.set_grad_enabled(bool(trainable)),
        ):
            step()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            seconds = time.perf_counter() - t0
    finally:
        for p in trainable:
            p.grad = None
        model.train(was_training)
    return steps / seconds if seconds > 0 else float("inf")
