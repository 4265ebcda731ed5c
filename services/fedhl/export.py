"""Export the final global update: a standard PEFT LoRA adapter at a chosen rank, or merged
base weights (ALGORITHMS.md, "Export").

The math comes from `fedhl.core` (partial SVD, start factors); this module only validates,
names tensors the way peft does and writes files (safetensors + JSON, never pickle).

Adapter: for every module the dense effective update `W (d_out, d_in)` becomes
`B = U_r Σ_r / s`, `A = Vh_r` with `s = scaling.scale(r)`, so peft's `s · B @ A` is
`trunc(W, r)`. The dropped part `W − trunc(W, r)` is measured and returned in the
`ExportReport`. Keys follow `peft.get_peft_model_state_dict` for a LoRA model:

    base_model.model.<module>.lora_A.weight   (r, d_in)
    base_model.model.<module>.lora_B.weight   (d_out, r)
    base_model.model.<param>                  modules_to_save params, e.g. classifier.weight

Merged: `W0 + W` written into "<module>.weight" of the base state dict.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .core.merge import pad_factors, start_factors
from .core.scaling import LoRAScaling
from .core.svd import SVDConfig, partial_svd
from .core.types import GlobalState, LoRAFactors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .core.strategies.base import Strategy

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the base)
# Modules that peft's task-specific PeftModel classes add to modules_to_save on their own
# (peft/peft_model.py, PeftModelFor{SequenceClassification,TokenClassification,
# QuestionAnswering}). On load peft looks up every parameter of every such module in the
# adapter file and fails with a KeyError when one is missing, so the export must write them.
AUTO_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


class ExportError(ValueError):
    """The state or the options cannot give the requested adapter or merged model."""


# --------------------------------------------------------------------------- report types
@dataclass(frozen=True)
class ModuleExport:
    """One module's export: what the rank-r adapter keeps of `W` and what it drops."""

    module: str
    shape: tuple[int, int]  # (d_out, d_in)
    dropped_energy: float  # ‖W − trunc(W, r)‖²_F
    total_energy: float  # ‖W‖²_F
    svd_method: str

    @property
    def dropped_fraction(self) -> float:
        """‖W − trunc(W, r)‖²_F / ‖W‖²_F (0 when W = 0)."""
        return self.dropped_energy / self.total_energy if self.total_energy > 0 else 0.0

    @property
    def error_fro(self) -> float:
        """‖W − trunc(W, r)‖_F: the Frobenius distance of the adapted model from W0 + W."""
        return math.sqrt(self.dropped_energy)


@dataclass(frozen=True)
class ExportReport:
    """What `export_peft_adapter` wrote and how much of the global update it dropped."""

    out_dir: Path
    rank: int
    scale: float  # s(r) that peft applies: alpha / r or alpha / sqrt(r)
    rule: str
    modules: dict[str, ModuleExport]
    extras: list[str]  # full parameter names written for modules_to_save
    modules_to_save: list[str]  # as written to adapter_config.json (task defaults included)
    extras_from_base: list[str] = field(default_factory=list)  # copied from base_state
    files: list[Path] = field(default_factory=list)

    @property
    def dropped_energy(self) -> float:
        return sum(m.dropped_energy for m in self.modules.values())

    @property
    def total_energy(self) -> float:
        return sum(m.total_energy for m in self.modules.values())

    @property
    def dropped_fraction(self) -> float:
        """Σ_ℓ ‖W_ℓ − trunc(W_ℓ, r)‖²_F / Σ_ℓ ‖W_ℓ‖²_F over all modules (0 when W = 0)."""
        total = self.total_energy
        return self.dropped_energy / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view for logs and the REST API."""
        return {
            "out_dir": str(self.out_dir),
            "rank": self.rank,
            "scale": self.scale,
            "rule": self.rule,
            "dropped_energy": self.dropped_energy,
            "total_energy": self.total_energy,
            "dropped_fraction": self.dropped_fraction,
            "modules": {
                name: {
                    "shape": list(m.shape),
                    "dropped_energy": m.dropped_energy,
                    "total_energy": m.total_energy,
                    "dropped_fraction": m.dropped_fraction,
                    "svd_method": m.svd_method,
                }
                for name, m in self.modules.items()
            },
            "extras": list(self.extras),
            "modules_to_save": list(self.modules_to_save),
            "extras_from_base": list(self.extras_from_base),
            "files": [str(p) for p in self.files],
        }


# --------------------------------------------------------------------------- validation
def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ExportError(f"export rank must be an integer >= 1, got {rank!r}")


def _check_module_name(name: object) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
        raise ExportError(f"update keys must be dotted module paths, got {name!r}")
    if ".." in name:
        raise ExportError(f"module path {name!r} has an empty component")
    if name.endswith((".weight", ".bias")):
        raise ExportError(
            f"update keys are module paths, not parameter names: got {name!r}; "
            f"drop the trailing '.{name.rsplit('.', 1)[1]}'"
        )
    return name


def _check_update(name: str, W: object) -> Tensor:
    if not isinstance(W, Tensor):
        raise ExportError(f"update for module {name!r} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ExportError(
            f"update for module {name!r} must be a 2-D (d_out, d_in) nn.Linear weight update, "
            f"got shape {tuple(W.shape)}"
        )
    if not W.is_floating_point():
        raise ExportError(f"update for module {name!r} must be floating point, got {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        raise ExportError(f"update for module {name!r} has non-finite values (NaN or Inf)")
    return W


def _check_updates(updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not updates:
        raise ExportError("no module updates to export")
    return {_check_module_name(m): _check_update(m, W) for m, W in updates.items()}


def _check_against_base(name: str, shape: Sequence[int], base_state: Mapping[str, Tensor], key: str, what: str) -> None:
    if key not in base_state:
        raise ExportError(f"unknown {what} {name!r}: the base model has no parameter {key!r}")
    ref = tuple(base_state[key].shape)
    if tuple(shape) != ref:
        raise ExportError(f"shape mismatch for {what} {name!r}: got {tuple(shape)}, base parameter {key!r} is {ref}")


def _check_extras(extras: Mapping[str, Tensor], modules: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in extras.items():
        if not isinstance(key, str) or "." not in key.strip("."):
            raise ExportError(f"extras keys must be full parameter names such as 'classifier.weight', got {key!r}")
        if not isinstance(value, Tensor):
            raise ExportError(f"extra {key!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ExportError(f"extra {key!r} has non-finite values (NaN or Inf)")
        owner = key.rsplit(".", 1)[0]
        if owner in modules:
            raise ExportError(
                f"extra {key!r} belongs to LoRA target module {owner!r}; a module cannot be both "
                "a LoRA target and in modules_to_save"
            )
        out[key] = value
    return out


def _saved_by_peft(param: str, modules_to_save: Sequence[str]) -> bool:
    """Whether peft wraps a module holding `param`: some ancestor module path ends with an
    entry (peft's `_set_trainable` uses a plain `str.endswith`)."""
    parts = param.split(".")[:-1]
    paths = (".".join(parts[: i + 1]) for i in range(len(parts)))
    return any(p.endswith(m) for p in paths for m in modules_to_save)


def _resolve_modules_to_save(extras: Mapping[str, Tensor], modules_to_save: list[str] | None) -> list[str]:
    """Default: the owning module of every extra. Given: every extra must be covered, with
    peft's own rule (a module is wrapped when its path ends with an entry)."""
    owners = sorted({k.rsplit(".", 1)[0] for k in extras})
    if modules_to_save is None:
        return owners
    if any(not isinstance(m, str) or not m for m in modules_to_save):
        raise ExportError(f"modules_to_save entries must be non-empty strings, got {modules_to_save}")
    uncovered = [k for k in extras if not _saved_by_peft(k, modules_to_save)]
    if uncovered:
        raise ExportError(
            f"extras {uncovered} are not under any module in modules_to_save={modules_to_save}; "
            "peft would not load them"
        )
    return list(dict.fromkeys(modules_to_save))


def _complete_heads(
    ext: Mapping[str, Tensor],
    to_save: list[str],
    task: str | None,
    base_state: Mapping[str, Tensor] | None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Add the parameters peft will demand on load that `extras` lacks, from `base_state`.

    Without `base_state` only the task's automatic heads can be checked, coarsely: at least
    one of their parameters must be in `extras`.
    """
    out = dict(ext)
    if base_state is None:
        auto = AUTO_MODULES_TO_SAVE.get(task or "", ())
        if auto and not any(_saved_by_peft(k, auto) for k in ext):
            raise ExportError(
                f"task_type {task!r} makes peft load the modules {list(auto)} from the adapter, "
                "but extras has none of their parameters; pass the head in extras (e.g. "
                "'classifier.weight', 'classifier.bias') or pass base_state to write the "
                "base model's head"
            )
        return out, []
    filled = [k for k in base_state if k not in out and _saved_by_peft(k, to_save)]
    for k in filled:
        out[k] = base_state[k]
    return out, filled


def _check_task_type(task_type: str | None) -> str | None:
    from peft import TaskType

    if task_type is None:
        return None
    valid = [t.value for t in TaskType]
    if task_type not in valid:
        raise ExportError(f"unknown peft task_type {task_type!r}; expected one of {valid} or None")
    return str(task_type)


# --------------------------------------------------------------------------- math
def _factor_module(
    W: Tensor, rank: int, scaling: LoRAScaling, svd_cfg: SVDConfig | None
) -> tuple[LoRAFactors, float, float, str]:
    """Factors at `rank`, ‖W − s·B@A‖²_F, ‖W‖²_F and the SVD method used."""
    dtype = torch.promote_types(W.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
    Wc = W.detach().to(dtype)  # (d_out, d_in)
    spec = partial_svd(Wc, rank, svd_cfg)  # k = min(rank, d_out, d_in) triplets
    s = scaling.scale(rank)  # the scale peft applies to the exported rank
    f = pad_factors(start_factors(spec, spec.k, s, "all_in_B"), rank)  # B (d_out, r), A (r, d_in)
    if spec.is_zero():
        return f, 0.0, 0.0, spec.method
    residual = Wc - s * (f.B @ f.A)  # (d_out, d_in): exactly what the adapter misses
    dropped = float((residual.double() ** 2).sum())
    return f, dropped, spec.total_energy, spec.method


def adapter_factors(
    W: Tensor, rank: int, scaling: LoRAScaling, svd_cfg: SVDConfig | None = None
) -> tuple[LoRAFactors, float]:
    """LoRA factors of `W` at `rank` with `scaling.scale(rank) · B @ A == trunc(W, rank)`.

    B = U_r Σ_r / s (d_out, r), A = Vh_r (r, d_in), computed in float32 or better (float64
    stays float64). When `rank > min(d_out, d_in)` the factors are zero-padded to `rank`
    (the product is unchanged). Returns the factors and the dropped energy fraction
    ‖W − trunc(W, r)‖²_F / ‖W‖²_F (0 when W = 0).
    """
    _check_rank(rank)
    _check_update("W", W)
    f, dropped, total, _ = _factor_module(W, rank, scaling, svd_cfg)
    return f, (dropped / total if total > 0 else 0.0)


# --------------------------------------------------------------------------- file writing
def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _adapter_config(
    *,
    rank: int,
    scaling: LoRAScaling,
    target_modules: list[str],
    base_model_name_or_path: str | None,
    task_type: str | None,
    modules_to_save: list[str],
) -> dict[str, Any]:
    """adapter_config.json contents, built by peft's own LoraConfig so every field and
    default matches what `PeftModel.save_pretrained` writes."""
    from peft import LoraConfig

    alpha = scaling.alpha
    cfg = LoraConfig(
        r=rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=list(target_modules),
        use_rslora=scaling.rule == "rslora",
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        modules_to_save=list(modules_to_save) or None,
        inference_mode=True,
    )
    out: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():  # sets -> sorted lists: deterministic files
        out[key] = sorted(value) if isinstance(value, set) else value
    return out


def export_peft_adapter(
    updates: Mapping[str, Tensor],
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    scaling: LoRAScaling,
    base_model_name_or_path: str | None,
    task_type: str | None,
    extras: Mapping[str, Tensor] | None = None,
    modules_to_save: list[str] | None = None,
    svd_cfg: SVDConfig | None = None,
    dtype: torch.dtype = torch.float32,
    base_state: Mapping[str, Tensor] | None = None,
) -> ExportReport:
    """Write `updates` (module path -> dense effective update (d_out, d_in)) as a standard
    PEFT LoRA adapter directory at `rank`: adapter_config.json + adapter_model.safetensors.

    `extras` are non-LoRA trainable parameters keyed by their full name in the base model
    (e.g. "classifier.weight"); their modules go to `modules_to_save` (default: the owning
    module of each extra). `task_type` is a peft TaskType string ("SEQ_CLS", "CAUSAL_LM", …)
    or None. LoRA factors are written in `dtype`; extras keep their own dtype.
    `base_state` (optional, e.g. `model.state_dict()`) lets every module and extra be
    checked against the base model before anything is written, and supplies the parameters
    of modules_to_save modules that `extras` lacks. This matters for task types whose peft
    class adds a head to modules_to_save by itself (SEQ_CLS/TOKEN_CLS: "classifier",
    "score"; QUESTION_ANS: "qa_outputs"): peft cannot load such an adapter without the head.

    Validation happens before any file is touched; files are replaced atomically.
    """
    _check_rank(rank)
    if not dtype.is_floating_point:
        raise ExportError(f"adapter dtype must be floating point, got {dtype}")
    mods = _check_updates(updates)
    ext = _check_extras(extras or {}, mods)
    task = _check_task_type(task_type)
    to_save = list(
        dict.fromkeys(_resolve_modules_to_save(ext, modules_to_save) + list(AUTO_MODULES_TO_SAVE.get(task or "", ())))
    )
    saved = [m for m in mods if _saved_by_peft(f"{m}.weight", to_save)]
    if saved:
        raise ExportError(
            f"LoRA target modules {saved} fall under modules_to_save={to_save}; "
            "peft would replace them with full copies instead of adapting them"
        )
    if base_state is not None:
        for m, W in mods.items():
            _check_against_base(m, W.shape, base_state, f"{m}.weight", "module")
        for k, v in ext.items():
            _check_against_base(k, v.shape, base_state, k, "extra")
    ext, from_base = _complete_heads(ext, to_save, task, base_state)

    tensors: dict[str, Tensor] = {}
    per_module: dict[str, ModuleExport] = {}
    for m, W in mods.items():
        f, dropped, total, method = _factor_module(W, rank, scaling, svd_cfg)
        tensors[f"{PEFT_KEY_PREFIX}{m}.lora_A.weight"] = f.A.to("cpu", dtype).contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{m}.lora_B.weight"] = f.B.to("cpu", dtype).contiguous()
        d_out, d_in = W.shape
        per_module[m] = ModuleExport(m, (int(d_out), int(d_in)), dropped, total, method)
    for k, v in ext.items():  # clone: safetensors refuses tensors that share storage
        tensors[f"{PEFT_KEY_PREFIX}{k}"] = v.detach().to("cpu").contiguous().clone()

    config = _adapter_config(
        rank=rank,
        scaling=scaling,
        target_modules=sorted(mods),
        base_model_name_or_path=base_model_name_or_path,
        task_type=task,
        modules_to_save=to_save,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = out / ADAPTER_WEIGHTS_NAME, out / ADAPTER_CONFIG_NAME
    _atomic_write(weights_path, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(config_path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return ExportReport(
        out,
        rank,
        scaling.scale(rank),
        scaling.rule,
        per_module,
        sorted(ext),
        to_save,
        sorted(from_base),
        [config_path, weights_path],
    )


def effective_updates(strategy: Strategy, state: GlobalState) -> dict[str, Tensor]:
    """module -> the dense update the served model adds to W0, for any strategy's state."""
    return {m: strategy.effective_update(state, m) for m in state.modules}


# --------------------------------------------------------------------------- merged export
def merge_into_base(base_state: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Base weights with `W0 + W` in "<module>.weight" for every update; other entries are
    the same tensor objects as in `base_state` (not copied). The sum is formed in the wider
    of the two dtypes (at least float32) and stored in W0's dtype and device."""
    mods = _check_updates(updates)
    for m, W in mods.items():
        _check_against_base(m, W.shape, base_state, f"{m}.weight", "module")
    merged = dict(base_state)
    for m, W in mods.items():
        key = f"{m}.weight"
        W0 = base_state[key]  # (d_out, d_in)
        tied = [k for k, v in base_state.items() if k != key and v.data_ptr() == W0.data_ptr() and v.shape == W0.shape]
        if tied:
            raise ExportError(f"{key!r} is tied to {tied}; merging would untie the weights")
        acc = torch.promote_types(torch.promote_types(W0.dtype, W.dtype), torch.float32)
        new = (W0.to(acc) + W.to(device=W0.device, dtype=acc)).to(W0.dtype)  # (d_out, d_in)
        if not bool(torch.isfinite(new).all()):
            raise ExportError(f"merged weight {key!r} is not finite (overflow in {W0.dtype}?)")
        merged[key] = new
    return merged


def save_merged(model: PreTrainedModel, updates: Mapping[str, Tensor], out_dir: str | os.PathLike[str]) -> Path:
    """Save `model` with `W0 + W` merged into its weights (safetensors, via
    `model.save_pretrained`). The model itself is not modified."""
    merged = merge_into_base(model.state_dict(), updates)
    out = Path(out_dir)
    model.save_pretrained(out, state_dict=merged)
    return out
