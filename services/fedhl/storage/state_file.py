"""A `GlobalState` as one safetensors file: `dense::<module>`, `lora_B::<module>`,
`lora_A::<module>`, `extra::<name>` tensors, and the round in the metadata."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.types import GlobalState, LoRAFactors

FORMAT = "fedhl-state/1"


class StateFileError(ValueError):
    """The file is not a FedHL state (wrong format, truncated, inconsistent keys)."""


def save_state(state: GlobalState, path: str | Path) -> None:
    # sorted: the same state is the same bytes, hence the same content address
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(state.tensors().items())}
    # one metadata entry: safetensors keeps metadata in a hash map whose order varies per process
    save_file(tensors, str(path), metadata={"fedhl": json.dumps({"format": FORMAT, "round": state.round})})


def load_state(path: str | Path, modules: Collection[str] | None = None) -> GlobalState:
    """The state in `path`; with `modules`, only those modules (and every extra) are read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if modules is None:
                tensors = load_file(str(path))
            else:
                keep = set(modules)
                names = list(f.keys())  # a safe_open handle is not a mapping
                tensors = {k: f.get_tensor(k) for k in names if k.partition("::")[2] in keep or k.startswith("extra::")}
    except (SafetensorError, OSError) as e:
        raise StateFileError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        info = json.loads(meta.get("fedhl", "{}"))
    except json.JSONDecodeError:
        info = {}
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise StateFileError(f"{path}: not a {FORMAT!r} file")
    if not isinstance(info.get("round"), int) or info["round"] < 0:
        raise StateFileError(f"{path}: metadata has no valid round")
    state = GlobalState(round=info["round"])
    B: dict[str, object] = {}
    A: dict[str, object] = {}
    for key, t in tensors.items():
        kind, _, name = key.partition("::")
        if kind == "dense":
            state.dense[name] = t
        elif kind == "lora_B":
            B[name] = t
        elif kind == "lora_A":
            A[name] = t
        elif kind == "extra":
            state.extras[name] = t
        else:
            raise StateFileError(f"{path}: unexpected tensor {key!r}")
    if set(B) != set(A):
        raise StateFileError(f"{path}: unpaired LoRA factors {sorted(set(B) ^ set(A))}")
    if state.dense and B:
        raise StateFileError(f"{path}: both dense and factor modules")
    for name in B:
        try:
            state.factors[name] = LoRAFactors(B[name], A[name])  # type: ignore[arg-type]
        except ValueError as e:
            raise StateFileError(f"{path}: module {name!r}: {e}") from None
    return state
