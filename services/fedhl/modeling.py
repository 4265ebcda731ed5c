"""What the server needs to know about a base model without loading its weights: the shapes
of the LoRA target modules and of the trainable head."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


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
                raise ValueError(f"target module {name} is {type(mod).__name__}, only Linear is supported")
            shapes[name] = (int(mod.out_features), int(mod.in_features))
    if not shapes:
        raise ValueError(f"no module of {base_model} matches target_modules {target_modules}")
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
        raise ValueError(f"{root}: no model files to hash")
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
