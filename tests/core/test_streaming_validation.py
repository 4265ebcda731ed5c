"""Uploads are validated from the file, header first (names, dtypes, shapes) and then one
tensor at a time: each bad payload gets a precise error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedhl.codec import Expected, PayloadError, validate_update_file

EXP = Expected({"q": (6, 5)}, 2, {"head": (3,)})


def good() -> dict[str, torch.Tensor]:
    return {"lora_B::q": torch.ones(6, 2), "lora_A::q": torch.ones(2, 5), "extra::head": torch.zeros(3)}


def write(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "u.safetensors"
    save_file(tensors, str(path))
    return path


def test_a_valid_update_passes(tmp_path: Path) -> None:
    validate_update_file(write(tmp_path, good()), EXP)
    validate_update_file(write(tmp_path, {k: v.to(torch.bfloat16) for k, v in good().items()}), EXP)


@pytest.mark.parametrize(
    ("case", "change", "error"),
    [
        ("missing", lambda t: t.pop("lora_A::q"), "missing tensors: ['lora_A::q']"),
        ("unknown", lambda t: t.update({"x": torch.ones(1)}), "unexpected tensors: ['x']"),
        ("int dtype", lambda t: t.update({"lora_B::q": torch.ones(6, 2, dtype=torch.int32)}), "lora_B::q: dtype I32"),
        ("float64", lambda t: t.update({"extra::head": torch.zeros(3, dtype=torch.float64)}), "dtype F64"),
        ("rank", lambda t: t.update({"lora_B::q": torch.ones(6, 4)}), "lora_B::q: expected shape (6, 2)"),
        ("extra shape", lambda t: t.update({"extra::head": torch.zeros(4)}), "extra::head: expected shape (3,)"),
        ("NaN", lambda t: t["lora_A::q"].__setitem__((0, 0), float("nan")), "lora_A::q: contains NaN or Inf"),
        ("Inf", lambda t: t["extra::head"].__setitem__(1, float("inf")), "extra::head: contains NaN or Inf"),
    ],
)
def test_a_bad_update_is_refused_with_a_precise_error(case: str, change: object, error: str, tmp_path: Path) -> None:
    tensors = good()
    change(tensors)  # type: ignore[operator]
    with pytest.raises(PayloadError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate_update_file(write(tmp_path, tensors), EXP)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x05\x00", (10**12).to_bytes(8, "little") + b"{}", (4).to_bytes(8, "little") + b"[1]x", b"\x00" * 64],
)
def test_a_malformed_file_is_not_a_safetensors_payload(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "u.safetensors"
    path.write_bytes(raw)
    with pytest.raises(PayloadError, match=r"not a valid safetensors payload|missing tensors"):
        validate_update_file(path, EXP)


def test_values_truncated_after_a_valid_header_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, good())
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(PayloadError, match="not a valid safetensors payload"):
        validate_update_file(path, EXP)
