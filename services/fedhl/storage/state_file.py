"""A `GlobalState` as one safetensors file: `dense::<module>`, `lora_B::<module>`,
`lora_A::<module>`, `extra::<name>` tensors, and the round in the metadata."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.types import GlobalState, LoRAFactors

FORMAT = "fedhl-state/1"


class StateFileError(ValueError):
    """The file is not a FedHL state (wrong format, truncated, inconsistent keys)."""


def save_state(state: GlobalState, path: str | Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "round": str(state.round)})


def load_state(path: str | Path) -> GlobalState:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise StateFileError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise StateFileError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        state = GlobalState(round=int(meta["round"]))
    except (KeyError, ValueError):
        raise StateFileError(f"{path}: metadata has no valid round") from None
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
