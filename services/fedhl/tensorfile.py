"""safetensors files written and copied tensor by tensor, so a file larger than memory never has
to be held whole (the stock `save_file` needs every tensor at once).

The format: an 8-byte little-endian header length, a JSON header (`__metadata__` plus, per
tensor, dtype, shape and `data_offsets` relative to the end of the header), then the raw
little-endian bytes. `header` lays tensors out as safetensors itself does — by dtype, widest
first, then by name — and pads the header with spaces to a multiple of 8, so a file written
here has the same bytes as `save_file` of the same tensors (with at most one metadata entry:
safetensors orders several by a per-process hash; here they are sorted).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from torch import Tensor

# safetensors' Dtype enum order (the layout sorts by it, widest first)
_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_ORDER = {name: i for i, name in enumerate(_DTYPES.values())}
_BY_NAME = {name: dt for dt, name in _DTYPES.items()}
_COPY_CHUNK = 16 << 20


class TensorFileError(ValueError):
    """A tensor file cannot be written or read as asked."""


@dataclass(frozen=True)
class Entry:
    """One tensor's place in a file: dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def header(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and header for tensors `specs` (name -> dtype, shape), laid out as
    safetensors lays them out."""
    head: dict[str, object] = {}
    if metadata is not None:
        head["__metadata__"] = dict(sorted(metadata.items()))
    pos = 0
    for name in sorted(specs, key=lambda n: (-_ORDER[_dtype_name(specs[n][0])], n)):
        dtype, shape = specs[name]
        size = nbytes(dtype, shape)
        head[name] = {"dtype": _dtype_name(dtype), "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """(name -> absolute byte range, metadata) of a safetensors file, without reading tensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TensorFileError(f"{path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise TensorFileError(f"{path}: header of {n} bytes")
        try:
            head = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{path}: header is not JSON ({e})") from None
    meta = head.pop("__metadata__", None) or {}
    entries = {}
    for name, info in head.items():
        a, b = info["data_offsets"]
        if info["dtype"] not in _BY_NAME:
            raise TensorFileError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        entries[name] = Entry(_BY_NAME[info["dtype"]], tuple(info["shape"]), 8 + n + a, 8 + n + b)
    return entries, meta


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise TensorFileError(f"dtype {dtype} cannot be stored") from None


def _raw(t: Tensor) -> memoryview:
    """A tensor's bytes as they are stored (CPU, contiguous, native little-endian)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().data


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def read_into(fd: int, e: Entry, t: Tensor) -> None:
    """Fill the (CPU, contiguous) tensor `t` with the bytes of entry `e` of the open file."""
    buf = t.reshape(-1).view(torch.uint8).numpy().data
    if len(buf) != e.end - e.start:
        raise TensorFileError(f"entry holds {e.end - e.start} bytes, the tensor {len(buf)}")
    pos = e.start
    while buf:
        n = os.preadv(fd, [buf], pos)
        if n <= 0:
            raise TensorFileError("file ended inside a tensor")
        buf, pos = buf[n:], pos + n


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> None:
    """Copy `length` bytes between files in the kernel where it can, else in 16 MB chunks."""
    while length > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        except OSError:  # another file system, or no copy_file_range: copy through a bounded buffer
            chunk = os.pread(src_fd, min(length, _COPY_CHUNK), src_off)
            _pwrite_all(dst_fd, memoryview(chunk), dst_off)
            n = len(chunk)
        if n <= 0:
            raise TensorFileError("source file ended before the range was copied")
        src_off, dst_off, length = src_off + n, dst_off + n, length - n


class PlannedWriter:
    """A safetensors file whose tensors are all known by name, dtype and shape up front: the
    header goes first, then each tensor's bytes land at their offset as they come, in any order.
    `close` checks that every tensor was written."""

    def __init__(
        self,
        path: str | Path,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        head = header(specs, metadata)
        self.entries, _ = _entries_of(head)
        self.pending = set(self.entries)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(self.fd, memoryview(head), 0)
        end = max((e.end for e in self.entries.values()), default=len(head))
        os.ftruncate(self.fd, end)

    def write(self, name: str, t: Tensor) -> None:
        e = self._entry(name, t.dtype, tuple(t.shape))
        _pwrite_all(self.fd, _raw(t), e.start)

    def copy(self, name: str, src_fd: int, src: Entry) -> None:
        """Copy a tensor stored with the same dtype and shape in another open file."""
        e = self._entry(name, src.dtype, src.shape)
        copy_range(src_fd, src.start, self.fd, e.start, e.end - e.start)

    def _entry(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Entry:
        if name not in self.pending:
            raise TensorFileError(f"{name}: not in this file's header, or written twice")
        e = self.entries[name]
        if (dtype, shape) != (e.dtype, e.shape):
            raise TensorFileError(f"{name}: expected {e.dtype} {e.shape}, got {dtype} {shape}")
        self.pending.discard(name)
        return e

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        os.close(fd)
        if self.pending:
            raise TensorFileError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")

    def __enter__(self) -> PlannedWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AppendWriter:
    """A safetensors file whose tensors are not known up front: their bytes are appended to a
    side file as they come, and `close` writes the header and then the appended bytes behind
    it (a copy in the kernel where possible). The layout is arrival order, which every
    safetensors reader accepts; use `PlannedWriter` where the bytes must match `save_file`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data_path = self.path.with_name(self.path.name + ".data")
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        self.size = 0

    def write(self, name: str, t: Tensor) -> None:
        if name in self.specs:
            raise TensorFileError(f"{name}: written twice")
        raw = _raw(t)
        _pwrite_all(self.fd, raw, self.size)
        self.specs[name] = (t.dtype, tuple(t.shape), self.size)
        self.size += len(raw)

    def close(self, metadata: Mapping[str, str] | None = None) -> None:
        head: dict[str, object] = {}
        if metadata is not None:
            head["__metadata__"] = dict(sorted(metadata.items()))
        for name, (dtype, shape, pos) in sorted(self.specs.items(), key=lambda kv: kv[1][2]):
            end = pos + nbytes(dtype, shape)
            head[name] = {"dtype": _dtype_name(dtype), "shape": list(shape), "data_offsets": [pos, end]}
        raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        prefix = struct.pack("<Q", len(raw)) + raw
        out = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(out, memoryview(prefix), 0)
            copy_range(self.fd, 0, out, len(prefix), self.size)
        finally:
            os.close(out)
            self.discard()

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.data_path.unlink(missing_ok=True)


def _entries_of(prefix: bytes) -> tuple[dict[str, Entry], dict[str, str]]:
    (n,) = struct.unpack("<Q", prefix[:8])
    head = json.loads(prefix[8 : 8 + n])
    meta = head.pop("__metadata__", None) or {}
    return {
        k: Entry(_BY_NAME[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
        for k, v in head.items()
    }, meta


def encode(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """In memory, the bytes `PlannedWriter` writes (for small files: spectra, start packages),
    with metadata in a fixed order so the same content is always the same content address."""
    head = header({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata)
    entries, _ = _entries_of(head)
    out = bytearray(head)
    for name in sorted(entries, key=lambda k: entries[k].start):
        out += _raw(tensors[name])
    return bytes(out)
