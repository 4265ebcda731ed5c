"""Every tensor-file layout FedHL writes, in one place (all safetensors, never pickle).

- state:   `dense::<m>` | `lora_B::<m>` + `lora_A::<m>`, `extra::<name>`; metadata
           `fedhl = {"format": "fedhl-state/1", "round": t}`.
- update (agent → server): `lora_B::<m>` (d_out, r), `lora_A::<m>` (r, d_in), `extra::<name>`.
- start package (server → agent): the update's keys plus `residual::<m>` (dense) or
  `residual_B::<m>`/`residual_A::<m>` (low rank, scale 1) added to the frozen base weight;
  under a factored downlink no residual, and metadata `state_sha256` = {module: sha256 of
  W_t} (core/downlink.py), the state the agent must hold.
- change (server → agent, factored downlink): the round's `W_{t+1} − W_t` per module as
  `change_B::<m>` (d_out, K) + `change_A::<m>` (K, d_in), or `value::<m>` (the new module
  itself, when that is smaller); metadata `fedhl = {"format": "fedhl-change/1", "round": t+1}`
  and `state_sha256` of W_{t+1}.
- spectra: `U::<m>`, `S::<m>`, `Vh::<m>` with `spectrum::<m>` metadata.
- shard result (one aggregation task's output): the state under `state::`, the next round's
  spectra under `next::`, each rank's start package under `start::<rank>::`, the change under
  `delta::` and module hashes as `sha256::<m>` metadata (factored downlink), tensors that
  share memory stored once (`aliases`), the partial report, round and rank set as metadata.
  Written module by module (`ShardWriter`); the round's artifacts are written from the shard
  files byte range by byte range (`assemble_files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save, save_file
from torch import Tensor

from .core.downlink import Change
from .core.svd import Spectrum
from .core.types import ClientStart, GlobalState, LoRAFactors
from .tensorfile import AppendWriter, Entry, PlannedWriter, TensorFileError, encode, read_header, read_into

STATE_FORMAT = "fedhl-state/1"
CHANGE_FORMAT = "fedhl-change/1"
START_HASHES = "state_sha256"  # start package / change metadata: {module: sha256} of the state to hold
ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


class CodecError(ValueError):
    """A tensor file does not have the layout its reader expects."""


class StateFileError(CodecError):
    """The file is not a FedHL state (wrong format, truncated, inconsistent keys)."""


class PayloadError(CodecError):
    """The payload is not what the assignment expects; the message says exactly why."""


def _cpu(t: Tensor) -> Tensor:
    return t.detach().contiguous().cpu()


# ------------------------------------------------------------------------------------ state
def state_metadata(round_: int) -> dict[str, str]:
    # one metadata entry: safetensors keeps metadata in a hash map whose order varies per process
    return {"fedhl": json.dumps({"format": STATE_FORMAT, "round": round_})}


def save_state(state: GlobalState, path: str | Path) -> None:
    # sorted: the same state is the same bytes, hence the same content address
    tensors = {k: _cpu(v) for k, v in sorted(state.tensors().items())}
    save_file(tensors, str(path), metadata=state_metadata(state.round))


class StateReader:
    """A stored state, read one module at a time: the header is checked when the reader opens,
    each module is read from the file when asked for (into memory of its own, so releasing it
    releases it), so a worker need not hold the whole state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:  # validates offsets and sizes
                meta = f.metadata() or {}
            self.entries, _ = read_header(path)
        except (SafetensorError, TensorFileError, OSError) as e:
            raise StateFileError(f"{path}: not a readable safetensors file ({e})") from None
        try:
            info = json.loads(meta.get("fedhl", "{}"))
        except json.JSONDecodeError:
            info = {}
        if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
            raise StateFileError(f"{path}: not a {STATE_FORMAT!r} file")
        if not isinstance(info.get("round"), int) or info["round"] < 0:
            raise StateFileError(f"{path}: metadata has no valid round")
        self.round: int = info["round"]
        by_kind: dict[str, set[str]] = {"dense": set(), "lora_B": set(), "lora_A": set(), "extra": set()}
        for key in self.entries:
            kind, _, name = key.partition("::")
            if kind not in by_kind:
                raise StateFileError(f"{path}: unexpected tensor {key!r}")
            by_kind[kind].add(name)
        if by_kind["lora_B"] != by_kind["lora_A"]:
            raise StateFileError(f"{path}: unpaired LoRA factors {sorted(by_kind['lora_B'] ^ by_kind['lora_A'])}")
        if by_kind["dense"] and by_kind["lora_B"]:
            raise StateFileError(f"{path}: both dense and factor modules")
        self.dense = bool(by_kind["dense"])
        self.modules = sorted(by_kind["dense"] | by_kind["lora_B"])
        self.extra_names = sorted(by_kind["extra"])

    def _read(self, key: str) -> Tensor:
        e = self.entries[key]
        t = torch.empty(e.shape, dtype=e.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            read_into(fd, e, t)
        finally:
            os.close(fd)
        return t

    def module(self, name: str) -> Tensor | LoRAFactors:
        """Module `name`: its dense W_t, or its factors."""
        if self.dense:
            return self._read(f"dense::{name}")
        try:
            return LoRAFactors(self._read(f"lora_B::{name}"), self._read(f"lora_A::{name}"))
        except ValueError as e:
            raise StateFileError(f"{self.path}: module {name!r}: {e}") from None

    def placeholder(self, name: str) -> Tensor | LoRAFactors:
        """Module `name` with its shape and dtype but no data (device "meta"), to stand in for
        it until it is read."""

        def meta(key: str) -> Tensor:
            e = self.entries[key]
            return torch.empty(e.shape, dtype=e.dtype, device="meta")

        if self.dense:
            return meta(f"dense::{name}")
        return LoRAFactors(meta(f"lora_B::{name}"), meta(f"lora_A::{name}"))

    def extras(self) -> dict[str, Tensor]:
        return {k: self._read(f"extra::{k}") for k in self.extra_names}


def load_state(path: str | Path, modules: Collection[str] | None = None) -> GlobalState:
    """The state in `path`; with `modules`, only those modules (and every extra) are read."""
    reader = StateReader(path)
    state = GlobalState(round=reader.round, extras=reader.extras())
    keep = reader.modules if modules is None else [m for m in reader.modules if m in set(modules)]
    for m in keep:
        t = reader.module(m)
        if isinstance(t, Tensor):
            state.dense[m] = t
        else:
            state.factors[m] = t
    return state


def _state_from(names: Iterable[str], get: Callable[[str], Tensor], round_: int) -> GlobalState:
    """A state from `dense::`/`lora_B::`/`lora_A::`/`extra::` names read through `get`."""
    state = GlobalState(round=round_)
    for name in names:
        kind, _, m = name.partition("::")
        if kind == "dense":
            state.dense[m] = get(name)
        elif kind == "lora_B":
            state.factors[m] = LoRAFactors(get(name), get(f"lora_A::{m}"))
        elif kind == "extra":
            state.extras[m] = get(name)
    return state


# ----------------------------------------------------------------------------------- update
@dataclass(frozen=True)
class Expected:
    """What one assignment's upload must contain."""

    shapes: Mapping[str, tuple[int, int]]  # module -> (d_out, d_in)
    rank: int
    extras: Mapping[str, tuple[int, ...]]

    def max_bytes(self) -> int:
        """Upper bound on a valid payload's size (fp32 values plus a generous header)."""
        values = sum(self.rank * (o + i) for o, i in self.shapes.values())
        values += sum(int(torch.Size(s).numel()) for s in self.extras.values())
        return 4 * values + 256 * (len(self.shapes) * 2 + len(self.extras)) + (64 << 10)


def encode_update(
    factors: Mapping[str, LoRAFactors],
    extras: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    tensors: dict[str, Tensor] = {}
    for m, f in factors.items():
        tensors[f"lora_B::{m}"] = _cpu(f.B)
        tensors[f"lora_A::{m}"] = _cpu(f.A)
    for k, v in (extras or {}).items():
        tensors[f"extra::{k}"] = _cpu(v)
    return save(tensors, metadata=dict(metadata or {}))


def decode_file(path: str | Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise PayloadError(f"not a valid safetensors payload: {e}") from None


def decode_tensors(data: bytes) -> dict[str, Tensor]:
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PayloadError(f"not a valid safetensors payload: {e}") from None


def validate_update(tensors: Mapping[str, Tensor], exp: Expected) -> tuple[dict[str, LoRAFactors], dict[str, Tensor]]:
    """Check every module and extra is present with the assigned shapes, an allowed dtype and
    finite values; nothing else may be present."""
    expected_keys = {f"lora_{ab}::{m}" for m in exp.shapes for ab in "AB"} | {f"extra::{k}" for k in exp.extras}
    missing, unknown = expected_keys - set(tensors), set(tensors) - expected_keys
    if missing:
        raise PayloadError(f"missing tensors: {sorted(missing)[:5]}")
    if unknown:
        raise PayloadError(f"unexpected tensors: {sorted(unknown)[:5]}")
    for key, t in tensors.items():
        if t.dtype not in ALLOWED_DTYPES:
            raise PayloadError(f"{key}: dtype {t.dtype} not allowed (float32, float16, bfloat16)")
    factors: dict[str, LoRAFactors] = {}
    for m, (d_out, d_in) in exp.shapes.items():
        B, A = tensors[f"lora_B::{m}"], tensors[f"lora_A::{m}"]
        if tuple(B.shape) != (d_out, exp.rank) or tuple(A.shape) != (exp.rank, d_in):
            raise PayloadError(
                f"module {m}: expected B({d_out}, {exp.rank}) A({exp.rank}, {d_in}) for the "
                f"assigned rank, got B{tuple(B.shape)} A{tuple(A.shape)}"
            )
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise PayloadError(f"module {m}: factors contain NaN or Inf")
        factors[m] = LoRAFactors(B, A)
    extras: dict[str, Tensor] = {}
    for k, shape in exp.extras.items():
        t = tensors[f"extra::{k}"]
        if tuple(t.shape) != tuple(shape):
            raise PayloadError(f"extra {k}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise PayloadError(f"extra {k}: contains NaN or Inf")
        extras[k] = t
    return factors, extras


HEADER_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # = ALLOWED_DTYPES
MAX_HEADER_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


def _upload_header(path: Path) -> tuple[int, dict[str, TensorEntry]]:
    """(start of the data section, name -> entry) from a safetensors file's header alone.
    Raises PayloadError on a malformed header."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise PayloadError("not a valid safetensors payload: shorter than its header length")
            n = int.from_bytes(raw, "little")
            if n > MAX_HEADER_BYTES:
                raise PayloadError(f"not a valid safetensors payload: header of {n} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise PayloadError("not a valid safetensors payload: the header is not an object")
        out: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            out[name] = TensorEntry(str(info["dtype"]), tuple(int(d) for d in info["shape"]), int(begin), int(end))
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise PayloadError(f"not a valid safetensors payload: {e}") from None
    return 8 + n, out


def validate_update_file(path: Path, exp: Expected) -> None:
    """What `validate_update` checks, streamed from the file: names, dtypes, shapes and byte
    ranges from the header first (a wrong payload is refused before any value is read), then
    each tensor's values read and checked one at a time, so memory holds one tensor, never the
    whole payload (plain reads, not a memory map: mapped pages would count in the RSS)."""
    data_start, declared = _upload_header(path)
    expected: dict[str, tuple[int, ...]] = {}
    for m, (d_out, d_in) in exp.shapes.items():
        expected[f"lora_B::{m}"] = (d_out, exp.rank)  # (d_out, r)
        expected[f"lora_A::{m}"] = (exp.rank, d_in)  # (r, d_in)
    for k, shape in exp.extras.items():
        expected[f"extra::{k}"] = tuple(shape)
    missing, unknown = expected.keys() - declared.keys(), declared.keys() - expected.keys()
    if missing:
        raise PayloadError(f"missing tensors: {sorted(missing)[:5]}")
    if unknown:
        raise PayloadError(f"unexpected tensors: {sorted(unknown)[:5]}")
    size = path.stat().st_size
    for key, e in sorted(declared.items()):
        if e.dtype not in HEADER_DTYPES:
            raise PayloadError(f"{key}: dtype {e.dtype} not allowed (float32, float16, bfloat16)")
        if e.shape != expected[key]:
            raise PayloadError(f"{key}: expected shape {expected[key]} for the assigned rank, got {e.shape}")
        nbytes = int(torch.Size(e.shape).numel()) * HEADER_DTYPES[e.dtype].itemsize
        if e.end - e.begin != nbytes or e.begin < 0 or data_start + e.end > size:
            raise PayloadError(f"not a valid safetensors payload: {key} has bad data offsets")
    try:  # the reader the merge uses must accept the layout too (it checks offsets on open; no values read)
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, RuntimeError, OSError) as err:
        raise PayloadError(f"not a valid safetensors payload: {err}") from None
    with path.open("rb") as f:
        for key, e in sorted(declared.items(), key=lambda kv: kv[1].begin):
            f.seek(data_start + e.begin)
            buf = bytearray(e.end - e.begin)
            if f.readinto(buf) != len(buf):
                raise PayloadError(f"not a valid safetensors payload: {key} is truncated")
            if buf and not bool(torch.isfinite(torch.frombuffer(buf, dtype=HEADER_DTYPES[e.dtype])).all()):
                raise PayloadError(f"{key}: contains NaN or Inf")
            del buf


class UploadFactors(Mapping[str, LoRAFactors]):
    """One stored upload's factors read module by module from its file, so the merge holds one
    module of every upload at a time rather than whole uploads.

    The header is read once; each module's factors are read with plain reads into memory of
    their own (not through a memory map: mapped file pages count in the worker's RSS and stay
    mapped as long as any tensor of the file lives), so releasing them releases them."""

    def __init__(self, path: Path, modules: list[str]) -> None:
        self.path, self.modules = path, modules
        try:
            self.entries, _ = read_header(path)
        except (TensorFileError, OSError, KeyError, TypeError, ValueError) as e:
            raise PayloadError(f"{path.name}: not a readable safetensors payload ({e})") from None

    def _read(self, fd: int, key: str) -> Tensor:
        try:
            e = self.entries[key]
        except KeyError:
            raise KeyError(key) from None
        t = torch.empty(e.shape, dtype=e.dtype)
        try:
            read_into(fd, e, t)
        except TensorFileError as err:
            raise PayloadError(f"{self.path.name}: {key}: {err}") from None
        return t

    def __getitem__(self, module: str) -> LoRAFactors:
        if module not in self.modules:
            raise KeyError(module)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return LoRAFactors(self._read(fd, f"lora_B::{module}"), self._read(fd, f"lora_A::{module}"))
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def read_update_extras(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k[len("extra::") :]: f.get_tensor(k) for k in f.keys() if k.startswith("extra::")}  # noqa: SIM118


# ---------------------------------------------------------------------------- start package
def start_tensors(start: ClientStart, *, as_float32: bool = True) -> dict[str, Tensor]:
    """The start package's tensors. Published packages are float32 (`as_float32`); a shard
    result keeps the merge's tensors as they are, so shared memory can be stored once."""

    def f(t: Tensor) -> Tensor:
        return _cpu(t).float() if as_float32 else _cpu(t)

    tensors: dict[str, Tensor] = {}
    for m, fa in start.factors.items():
        tensors[f"lora_B::{m}"] = f(fa.B)
        tensors[f"lora_A::{m}"] = f(fa.A)
    for m, r in start.base_residual.items():
        if isinstance(r, Tensor):
            tensors[f"residual::{m}"] = f(r)
        else:
            tensors[f"residual_B::{m}"] = f(r.B)
            tensors[f"residual_A::{m}"] = f(r.A)
    for k, v in start.extras.items():
        tensors[f"extra::{k}"] = _cpu(v)  # extras keep their dtype
    return tensors


def encode_start(start: ClientStart, metadata: Mapping[str, str] | None = None) -> bytes:
    return encode(start_tensors(start), dict(metadata or {}))


def _start_from(names: Iterable[str], get: Callable[[str], Tensor]) -> ClientStart:
    factors: dict[str, LoRAFactors] = {}
    residual: dict[str, Tensor | LoRAFactors] = {}
    extras: dict[str, Tensor] = {}
    for key in names:
        kind, _, name = key.partition("::")
        if kind == "lora_B":
            factors[name] = LoRAFactors(get(key), get(f"lora_A::{name}"))
        elif kind == "residual":
            residual[name] = get(key)
        elif kind == "residual_B":
            residual[name] = LoRAFactors(get(key), get(f"residual_A::{name}"))
        elif kind == "extra":
            extras[name] = get(key)
        elif kind not in ("lora_A", "residual_A"):
            raise PayloadError(f"unexpected tensor {key!r} in start package")
    return ClientStart(factors, residual, extras)


def decode_start(data: bytes) -> ClientStart:
    t = decode_tensors(data)
    return _start_from(t, t.__getitem__)


def read_metadata(data: bytes) -> dict[str, str]:
    """A safetensors payload's `__metadata__`, from its header alone."""
    if len(data) < 8:
        raise PayloadError("not a valid safetensors payload: shorter than its header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise PayloadError(f"not a valid safetensors payload: header of {n} bytes")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise PayloadError(f"not a valid safetensors payload: {e}") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PayloadError("not a valid safetensors payload: metadata is not a string map")
    return {str(k): v for k, v in meta.items()}


def start_hashes(data: bytes) -> dict[str, str] | None:
    """The module hashes a start package names (factored downlink), or None."""
    raw = read_metadata(data).get(START_HASHES)
    return None if raw is None else _hash_map(raw)


def _hash_map(raw: str) -> dict[str, str]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not all(isinstance(v, str) and len(v) == 64 for v in doc.values()):
        raise PayloadError(f"{START_HASHES}: not a module -> sha256 map")
    return {str(k): v for k, v in doc.items()}


# ----------------------------------------------------------------------------------- change
@dataclass(frozen=True)
class RoundChange:
    """One round's change as an agent receives it: W_{round} from W_{round-1}."""

    round: int
    changes: dict[str, Change]
    hashes: dict[str, str]  # of W_{round}


def change_tensors(changes: Mapping[str, Change]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for m, c in changes.items():
        if isinstance(c, Tensor):
            tensors[f"value::{m}"] = _cpu(c)
        else:
            tensors[f"change_B::{m}"] = _cpu(c.B)  # (d_out, K)
            tensors[f"change_A::{m}"] = _cpu(c.A)  # (K, d_in)
    return tensors


def change_metadata(round_: int, hashes: Mapping[str, str]) -> dict[str, str]:
    return {
        "fedhl": json.dumps({"format": CHANGE_FORMAT, "round": round_}),
        START_HASHES: json.dumps(dict(sorted(hashes.items()))),
    }


def encode_change(round_: int, changes: Mapping[str, Change], hashes: Mapping[str, str]) -> bytes:
    return encode(change_tensors(changes), change_metadata(round_, hashes))


def decode_change(data: bytes) -> RoundChange:
    meta = read_metadata(data)
    try:
        info = json.loads(meta.get("fedhl", "{}"))
    except ValueError:
        info = {}
    if not isinstance(info, dict) or info.get("format") != CHANGE_FORMAT or not isinstance(info.get("round"), int):
        raise PayloadError(f"not a {CHANGE_FORMAT!r} payload")
    hashes = _hash_map(meta.get(START_HASHES, "null"))
    t = decode_tensors(data)
    changes: dict[str, Change] = {}
    for key in t:
        kind, _, m = key.partition("::")
        if kind == "value":
            changes[m] = t[key]
        elif kind == "change_B":
            try:
                changes[m] = LoRAFactors(t[key], t[f"change_A::{m}"])
            except (KeyError, ValueError) as e:
                raise PayloadError(f"change for {m!r}: {e}") from None
        elif kind != "change_A":
            raise PayloadError(f"unexpected tensor {key!r} in a change")
    for key, v in t.items():
        if v.dtype != torch.float32 or not bool(torch.isfinite(v).all()):
            raise PayloadError(f"{key}: a change holds finite float32 values")
    return RoundChange(int(info["round"]), changes, hashes)


# ---------------------------------------------------------------------------------- spectra
def spectra_tensors(spectra: Mapping[str, Spectrum]) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {}
    for m, s in spectra.items():
        tensors[f"U::{m}"] = s.U.contiguous().cpu()
        tensors[f"S::{m}"] = s.S.contiguous().cpu()
        tensors[f"Vh::{m}"] = s.Vh.contiguous().cpu()
        meta[f"spectrum::{m}"] = json.dumps([s.total_energy, s.method, s.residual, s.seconds])
    return tensors, meta


def read_spectra(h: Any, meta: Mapping[str, str], prefix: str = "") -> dict[str, Spectrum]:
    out = {}
    for name in h.keys():  # noqa: SIM118 (safe_open handles are not mappings)
        if name.startswith(prefix + "U::"):
            m = name[len(prefix) + 3 :]
            total, method, residual, seconds = json.loads(meta[f"spectrum::{m}"])
            out[m] = Spectrum(
                h.get_tensor(f"{prefix}U::{m}"),
                h.get_tensor(f"{prefix}S::{m}"),
                h.get_tensor(f"{prefix}Vh::{m}"),
                total,
                method,
                residual,
                seconds,
            )
    return out


def encode_spectra(spectra: Mapping[str, Spectrum]) -> bytes:
    tensors, meta = spectra_tensors(spectra)
    return encode(tensors, meta)


def load_spectra(path: str | Path) -> dict[str, Spectrum]:
    with safe_open(str(path), framework="pt") as h:
        return read_spectra(h, h.metadata() or {})


# ----------------------------------------------------------------------------- shard result
@dataclass
class ShardResult:
    """What one aggregation task computed for its modules."""

    state: GlobalState  # new state of the shard's modules (+ extras on shard 0)
    spectra: dict[str, Spectrum]  # next round's spectra of those modules
    starts: dict[int, ClientStart]  # next round's start factors of those modules, per rank
    report: dict[str, Any] = field(default_factory=dict)  # partial report (JSON-safe)


class ShardWriter:
    """A shard result written part by part as the merge produces it — one module's new state,
    next-round spectra and start factors at a time, then the extras — so the worker never holds
    the shard's whole result (same layout as `save_shard`; `load_shard` reads either)."""

    def __init__(self, path: str | Path, round_: int, ranks: Iterable[int]) -> None:
        self.out = AppendWriter(path)
        self.meta: dict[str, str] = {"round": str(round_), "ranks": json.dumps(sorted(ranks))}
        self.aliases: dict[str, str] = {}

    def add(
        self,
        state: GlobalState,
        spectra: Mapping[str, Spectrum],
        starts: Mapping[int, ClientStart],
        changes: Mapping[str, Change] | None = None,
        hashes: Mapping[str, str] | None = None,
    ) -> None:
        """Some modules' results (with their extras, if `state` has any), and under a factored
        downlink their changes and new hashes. Tensors that share memory within one call are
        stored once."""
        tensors = {f"state::{k}": _cpu(v) for k, v in state.tensors().items()}
        tensors.update({f"delta::{k}": v for k, v in change_tensors(changes or {}).items()})
        self.meta.update({f"sha256::{m}": h for m, h in (hashes or {}).items()})
        spec_t, meta = spectra_tensors(spectra)
        tensors.update({f"next::{k}": v for k, v in spec_t.items()})
        for r, start in starts.items():
            lean = ClientStart(start.factors, start.base_residual)  # extras are the state's, published once
            tensors.update({f"start::{r}::{k}": v for k, v in start_tensors(lean, as_float32=False).items()})
        kept, aliases = _store_shared_once(tensors)
        for name in sorted(kept):
            self.out.write(name, kept[name])
        self.meta.update(meta)
        self.aliases.update(aliases)

    def close(self, report: Mapping[str, Any]) -> None:
        self.out.close({**self.meta, "aliases": json.dumps(self.aliases), "report": json.dumps(report)})

    def discard(self) -> None:
        self.out.discard()


def save_shard(res: ShardResult, path: str | Path) -> None:
    w = ShardWriter(path, res.state.round, res.starts)
    w.add(res.state, res.spectra, res.starts)
    w.close(res.report)


def _store_shared_once(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors to write, name -> name it is stored under). A tensor that is a view of the same
    memory as one already kept (FLoRA hands every rank the global state itself as its base
    residual) is recorded as an alias: safetensors refuses shared memory, and a copy per rank
    would multiply the shard's size."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        view = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in seen:
            aliases[name] = seen[view]
        else:
            seen[view] = name
            kept[name] = t
    return kept, aliases


def load_shard(path: str | Path) -> ShardResult:
    with safe_open(str(path), framework="pt") as h:
        meta = h.metadata() or {}
        aliases: dict[str, str] = json.loads(meta.get("aliases", "{}"))
        loaded: dict[str, Tensor] = {}

        def get(name: str) -> Tensor:  # an alias is the same tensor, as it was before storing
            stored = aliases.get(name, name)
            if stored not in loaded:
                loaded[stored] = h.get_tensor(stored)
            return loaded[stored]

        names = [*h.keys(), *aliases]
        state = _state_from(_under("state::", names), _prefixed(get, "state::"), int(meta["round"]))
        by_rank: dict[int, list[str]] = {r: [] for r in json.loads(meta.get("ranks", "[]"))}
        for name in _under("start::", names):
            r_s, _, rest = name.partition("::")
            by_rank.setdefault(int(r_s), []).append(rest)
        starts = {r: _start_from(rest, _prefixed(get, f"start::{r}::")) for r, rest in by_rank.items()}
        spectra = read_spectra(h, meta, prefix="next::")
        return ShardResult(state, spectra, starts, json.loads(meta["report"]))


def _under(prefix: str, names: Iterable[str]) -> list[str]:
    return [n[len(prefix) :] for n in names if n.startswith(prefix)]


def _prefixed(get: Callable[[str], Tensor], prefix: str) -> Callable[[str], Tensor]:
    return lambda name: get(prefix + name)


# --------------------------------------------------------------- shard results → artifacts
@dataclass
class AssembledFiles:
    """The round's artifacts, written from its shard results: the new state, the next round's
    spectra (None for strategies without) and one start package per rank."""

    round: int
    state: Path
    spectra: Path | None
    starts: dict[int, Path]
    reports: list[dict[str, Any]]
    change: Path | None = None  # factored downlink: the round's change (layout above)
    hashes: dict[str, str] = field(default_factory=dict)  # factored downlink: module -> sha256 of the new state


def assemble_files(shards: list[Path], out_dir: Path, start_meta: Mapping[str, str]) -> AssembledFiles:
    """Write the artifacts tensor by tensor, copying byte ranges between files (a start factor
    stored in another dtype than the published float32 is converted one tensor at a time). The
    state has the bytes `save_state` gives, spectra and start packages those of `encode_spectra`
    and `encode_start`."""
    srcs: dict[str, tuple[int, Entry]] = {}  # name in the shard files (aliases resolved) -> (fd, range)
    meta_all: dict[str, str] = {}
    reports: list[dict[str, Any]] = []
    ranks: set[int] = set()
    fds: list[int] = []
    try:
        for path in shards:
            entries, meta = read_header(path)
            fds.append(os.open(path, os.O_RDONLY))
            aliases: dict[str, str] = json.loads(meta.get("aliases", "{}"))
            for name in [*entries, *aliases]:
                srcs[name] = (fds[-1], entries[aliases.get(name, name)])
            meta_all.update({k: v for k, v in meta.items() if k.startswith(("spectrum::", "sha256::"))})
            reports.append(json.loads(meta["report"]))
            ranks.update(json.loads(meta.get("ranks", "[]")))
            round_ = int(meta["round"])
        state = {n[len("state::") :]: s for n, s in srcs.items() if n.startswith("state::")}
        out = AssembledFiles(round_, out_dir / "state.safetensors", None, {}, reports)
        _write_from(out.state, state, state_metadata(round_))
        spectra = {n[len("next::") :]: s for n, s in srcs.items() if n.startswith("next::")}
        if spectra:
            out.spectra = out_dir / "spectra.safetensors"
            _write_from(out.spectra, spectra, meta_all)
        out.hashes = {k[len("sha256::") :]: v for k, v in sorted(meta_all.items()) if k.startswith("sha256::")}
        hashes = {START_HASHES: json.dumps(out.hashes)} if out.hashes else {}
        change = {n[len("delta::") :]: s for n, s in srcs.items() if n.startswith("delta::")}
        if change:
            out.change = out_dir / "change.safetensors"
            _write_from(out.change, change, change_metadata(round_, out.hashes), float32=set(change))
        ranks.update(int(n.split("::")[1]) for n in srcs if n.startswith("start::"))
        extras = {n: s for n, s in state.items() if n.startswith("extra::")}
        for r in sorted(ranks):
            prefix = f"start::{r}::"
            factors = {n[len(prefix) :]: s for n, s in srcs.items() if n.startswith(prefix)}
            out.starts[r] = out_dir / f"start-{r}.safetensors"
            meta = {**start_meta, "rank": str(r), **hashes}
            _write_from(out.starts[r], {**factors, **extras}, meta, float32=set(factors))
        return out
    finally:
        for fd in fds:
            os.close(fd)


def _write_from(
    path: Path,
    srcs: Mapping[str, tuple[int, Entry]],
    metadata: Mapping[str, str],
    float32: Collection[str] = (),
) -> None:
    """A file of the tensors `srcs` (name -> range in an open file); names in `float32` are
    stored as float32 whatever their dtype in the source."""

    def dtype(name: str) -> torch.dtype:
        return torch.float32 if name in float32 else srcs[name][1].dtype

    with PlannedWriter(path, {n: (dtype(n), e.shape) for n, (_, e) in srcs.items()}, metadata) as w:
        for name, (fd, e) in srcs.items():
            if dtype(name) == e.dtype:
                w.copy(name, fd, e)
            else:
                t = torch.empty(e.shape, dtype=e.dtype)
                read_into(fd, e, t)
                w.write(name, t.float())
