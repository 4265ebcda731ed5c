"""What the server needs to know about a base model without loading its weights: the shapes
of the LoRA target modules and of the trainable head."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class ModelError(ValueError):
    """The base model or its modules do not fit what was asked (task type, target modules, shapes)."""


def matches(name: str, targets: list[str]) -> bool:
    """peft's rule: a module is targeted when its path equals an entry or ends with '.' + it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_shapes(
    base_model: str, target_modules: list[str], task_type: str, num_labels: int
) -> tuple[dict[str, tuple[int, int]], dict[str, list[int]]]:
    """(module path -> (d_out, d_in), head parameter -> shape), from the model's config only
    (built on the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(base_model, num_labels=num_labels)
    cls = AutoModelForSequenceClassification if task_type == "seq_cls" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        if matches(name, target_modules):
            if not isinstance(mod, torch.nn.Linear):
                raise ModelError(f"target module {name} is {type(mod).__name__}, only Linear is supported")
            shapes[name] = (int(mod.out_features), int(mod.in_features))
    if not shapes:
        raise ModelError(f"no module of {base_model} matches target_modules {target_modules}")
    extras: dict[str, list[int]] = {}
    if task_type == "seq_cls":
        for head in ("classifier", "score"):
            for pname, p in model.named_parameters():
                if pname.startswith(head + ".") or pname == head:
                    extras[pname] = list(p.shape)
            if extras:
                break
    return shapes, extras


def directory_sha256(path: str | Path) -> str:
    """Content hash of a local model directory: the weight and config files, in name order."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json", ".bin"})
    if not files:
        raise ModelError(f"{root}: no model files to hash")
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- loading the base
class BaseModelMismatch(ModelError):
    """The local base model is not the one the job names (content hash differs)."""


def verify_base(path: str | Path, expected_sha256: str) -> str:
    """Hash the local model directory and compare with the job's hash; return the hash.

    Raises `BaseModelMismatch` naming both hashes when they differ, `ValueError` when `path`
    is not a local directory (a hub id cannot be verified offline)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"cannot verify base model {str(path)!r}: not a local directory")
    actual = directory_sha256(root)
    if actual != expected_sha256.strip().lower():
        raise BaseModelMismatch(
            f"base model at {root} has sha256 {actual}, but the job expects {expected_sha256}; "
            "this agent holds a different model (or a different revision of it)"
        )
    return actual


def load_base(
    base_model: str | Path,
    task_type: str,
    num_labels: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init_seed: int = 0,
) -> tuple[Any, Any]:
    """(model, tokenizer) for `task_type` from a local path (or a hub id when online).

    Weights the checkpoint lacks (a fresh classification head, say) are initialised under
    `init_seed`, so every process that loads the same base gets the same model. A tokenizer
    without a pad token (GPT-2 style) pads with its EOS (or UNK) token, and the model's
    config learns that pad id (sequence classification finds the last real token by it).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task_type not in ("seq_cls", "causal_lm"):
        raise ModelError(f"unknown task_type {task_type!r}; expected 'seq_cls' or 'causal_lm'")
    if task_type == "seq_cls" and num_labels < 2:
        raise ModelError(f"sequence classification needs num_labels >= 2, got {num_labels}")
    name = str(base_model)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(f"tokenizer of {name} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if task_type == "seq_cls":
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- editing weights
def linear(model: torch.nn.Module, module: str) -> torch.nn.Linear:
    """The nn.Linear at `module` (a dotted path), with a clear error otherwise."""
    try:
        mod = model.get_submodule(module)
    except AttributeError:
        raise ModelError(f"the model has no module {module!r}") from None
    if not isinstance(mod, torch.nn.Linear):
        raise ModelError(f"module {module!r} is {type(mod).__name__}; only nn.Linear modules can be adapted")
    return mod


@torch.no_grad()
def add_to_weights(model: torch.nn.Module, updates: Mapping[str, Tensor]) -> None:
    """In place: `W ← W + U` for every module path -> dense (d_out, d_in) update `U`.

    The sum is formed in float32 or wider and stored in W's dtype; every shape is checked
    before any weight changes."""
    targets = {m: linear(model, m) for m in updates}
    for m, U in updates.items():
        W = targets[m].weight  # (d_out, d_in)
        if tuple(U.shape) != tuple(W.shape):
            raise ModelError(f"update for {m!r} has shape {tuple(U.shape)}, the weight is {tuple(W.shape)}")
        if not bool(torch.isfinite(U).all()):
            raise ModelError(f"update for {m!r} has non-finite values")
    for m, U in updates.items():
        W = targets[m].weight
        acc = torch.promote_types(torch.promote_types(W.dtype, U.dtype), torch.float32)
        W.copy_((W.to(acc) + U.to(device=W.device, dtype=acc)).to(W.dtype))


@torch.no_grad()
def set_parameters(model: torch.nn.Module, values: Mapping[str, Tensor]) -> None:
    """In place: copy `values` (full parameter names, e.g. 'classifier.weight') into the
    model's parameters; names and shapes are checked before anything is copied."""
    params = dict(model.named_parameters())
    for k, v in values.items():
        if k not in params:
            raise ModelError(f"the model has no parameter {k!r}")
        if tuple(v.shape) != tuple(params[k].shape):
            raise ModelError(f"{k!r}: got shape {tuple(v.shape)}, the parameter is {tuple(params[k].shape)}")
    for k, v in values.items():
        params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))
