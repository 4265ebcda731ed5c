"""safetensors files written tensor by tensor: the same bytes as the stock writer, readable by
`safe_open`, and a precise error for a tensor that does not fit the header."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from fedhl.tensorfile import AppendWriter, PlannedWriter, TensorFileError, encode, read_header

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.float32,
    torch.float64,
    torch.int64,
]


def random_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for _ in range(int(torch.randint(1, 8, (1,), generator=g))):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=g))]
        ndim = int(torch.randint(0, 3, (1,), generator=g))
        shape = [int(x) for x in torch.randint(0, 4, (ndim,), generator=g)]
        name = f"m{int(torch.randint(100, (1,), generator=g))}::é"
        out[name] = (torch.randn(shape, generator=g) * 10).to(dtype)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_planned_files_have_the_stock_writers_bytes(seed: int, tmp_path: Path) -> None:
    t = random_tensors(torch.Generator().manual_seed(seed))
    for meta in (None, {}, {"fedhl": '{"format": "x", "q": "\\n\\u0001é"}'}):
        assert encode(t, meta) == save(t, metadata=meta)
    path = tmp_path / "p.safetensors"
    with PlannedWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}, {"a": "b"}) as w:
        for k in reversed(list(t)):  # any order: each tensor lands at its offset
            w.write(k, t[k])
    assert path.read_bytes() == save(t, metadata={"a": "b"})


def test_appended_files_read_back_and_ranges_copy(tmp_path: Path) -> None:
    t = random_tensors(torch.Generator().manual_seed(7))
    a = AppendWriter(tmp_path / "a.safetensors")
    for k, v in t.items():
        a.write(k, v)
    a.close({"z": "1", "b": "2"})
    assert not (tmp_path / "a.safetensors.data").exists()
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"z": "1", "b": "2"} and set(f.keys()) == set(t)
        for k, v in t.items():
            assert torch.equal(f.get_tensor(k), v)
    entries, _ = read_header(tmp_path / "a.safetensors")
    fd = os.open(tmp_path / "a.safetensors", os.O_RDONLY)
    try:
        with PlannedWriter(tmp_path / "c.safetensors", {k: (e.dtype, e.shape) for k, e in entries.items()}) as w:
            for k, e in entries.items():
                w.copy(k, fd, e)
    finally:
        os.close(fd)
    assert (tmp_path / "c.safetensors").read_bytes() == save(t)


def test_a_tensor_that_does_not_fit_the_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    w = PlannedWriter(path, {"a": (torch.float32, (2, 3)), "b": (torch.float16, (1,))})
    with pytest.raises(TensorFileError, match=r"expected torch\.float32 \(2, 3\), got torch\.float32 \(3, 2\)"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(TensorFileError, match="not in this file's header, or written twice"):
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(TensorFileError, match=r"never written: \['b'\]"):
        w.close()
