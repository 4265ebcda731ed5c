"""The factored downlink of FedHL's `full` client view: pure math, no I/O.

The round's change `W_{t+1} − W_t` is one product of stacked factors `L @ R` (fedhl.py), of
inner size `K = Σ r_i + r_max`. An agent that holds `W_t` rebuilds `W_{t+1}` from those factors
instead of downloading a dense residual, and content hashes prove it holds what the server
holds. For that the server *defines* the new state as what the agent can recompute:

    W_{t+1} = apply_change(W_t, exact_factors(L, R))

`exact_factors` rounds L and R onto power-of-two grids fine enough that the values are float32
and coarse enough that every partial sum of `L_q @ R_q` in float64 is an exact integer multiple
of the grid (`bits_L + bits_R + ⌈log2 K⌉ ≤ 53`): the product is the same bits on every BLAS,
thread count and device. The sum with W_t is one correctly rounded float64 add and one rounding
to W's dtype, elementwise: the same bits everywhere too. The rounding moves the change by at
most 2^-bits of its largest factor entries (bits = 23 for K ≤ 128, 21 for K ≤ 2048), below
float32's own resolution of W for the shapes we run.

A module whose factors would cost more than its dense value (`K (d_out + d_in) ≥ d_out d_in`)
travels as the new value itself; the chain logic below treats both alike.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .types import LoRAFactors, ModuleName

Change = LoRAFactors | Tensor  # factors of W_{t+1} − W_t, or the new value W_{t+1} itself
F32_MIN_EXP = -149  # 2^-149: the smallest float32 (subnormal); every multiple of it below 2^-125 is a float32


class DownlinkError(ValueError):
    """A chain of changes does not fit the state it is applied to."""


def grid_bits(k: int) -> int:
    """Bits per factor entry so that K-term float64 dot products of grid values are exact."""
    return min(24, (53 - math.ceil(math.log2(max(k, 1)))) // 2)


def _to_grid(x: Tensor, bits: int) -> Tensor:
    """x (float64) rounded to multiples of 2^a, |x / 2^a| ≤ 2^bits, with a as small as allowed."""
    m = float(x.abs().max()) if x.numel() else 0.0
    if m == 0.0:
        return torch.zeros_like(x)
    _, e = math.frexp(m)  # m < 2^e
    a = max(e - bits, F32_MIN_EXP)
    step = 2.0**a
    return torch.round(x / step) * step  # division and product by a power of two are exact


def exact_factors(L: Tensor, R: Tensor) -> LoRAFactors:
    """(L_q, R_q) float32 on the device of L, with `L_q @ R_q ≈ L @ R` and that product exact in
    float64 on any device. L (d_out, K), R (K, d_in)."""
    k = int(L.shape[1])
    L64, R64 = L.to(torch.float64), R.to(torch.float64)  # (d_out, K), (K, d_in)
    if k == 0:
        return LoRAFactors(L64.float(), R64.float())
    cl, cr = L64.abs().amax(0), R64.abs().amax(1)  # (K,), (K,)
    live = (cl > 0) & (cr > 0)
    e = torch.zeros(k, dtype=torch.float64, device=L.device)
    e[live] = torch.round((torch.log2(cr[live]) - torch.log2(cl[live])) / 2)  # balance each rank-1 term
    L64 = L64 * torch.exp2(e) * live  # powers of two: the product is unchanged
    R64 = R64 * torch.exp2(-e)[:, None] * live[:, None]
    bits = grid_bits(k)
    return LoRAFactors(_to_grid(L64, bits).float(), _to_grid(R64, bits).float())


def apply_change(W: Tensor, change: Change) -> Tensor:
    """W_{t+1} from W_t and one change, in W's dtype and on W's device: the one function server
    and agents share."""
    if isinstance(change, Tensor):
        if tuple(change.shape) != tuple(W.shape):
            raise DownlinkError(f"new value has shape {tuple(change.shape)}, the state {tuple(W.shape)}")
        return change.to(device=W.device, dtype=W.dtype).clone()
    if change.shape != tuple(W.shape):
        raise DownlinkError(f"change factors give {change.shape}, the state is {tuple(W.shape)}")
    B, A = change.B.to(W.device, torch.float64), change.A.to(W.device, torch.float64)
    P = B @ A  # (d_out, d_in), exact: see exact_factors
    return (W.to(torch.float64) + P).to(W.dtype)


def factors_cheaper(shape: tuple[int, int], k: int) -> bool:
    """True when the change's factors take fewer values than the dense module."""
    d_out, d_in = shape
    return k * (d_out + d_in) < d_out * d_in


def change_values(change: Change) -> int:
    return change.numel() if isinstance(change, Tensor) else change.B.numel() + change.A.numel()


def module_sha256(W: Tensor) -> str:
    """sha256 of the tensor's canonical bytes (dtype, shape, then its values row-major in
    little-endian memory order), the content hash agents and server compare."""
    t = W.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_hashes(modules: Mapping[ModuleName, Tensor]) -> dict[ModuleName, str]:
    return {m: module_sha256(w) for m, w in sorted(modules.items())}


def mismatched(modules: Mapping[ModuleName, Tensor], hashes: Mapping[ModuleName, str]) -> list[ModuleName]:
    """Modules whose hash differs from `hashes` (or that are missing on either side)."""
    names = set(modules) | set(hashes)
    return sorted(m for m in names if m not in modules or m not in hashes or module_sha256(modules[m]) != hashes[m])


def rebuild(
    base: Mapping[ModuleName, Tensor], chain: Sequence[Mapping[ModuleName, Change]]
) -> dict[ModuleName, Tensor]:
    """Apply a chain of changes, oldest first, module by module."""
    out = dict(base)
    for i, changes in enumerate(chain):
        if set(changes) != set(out):
            raise DownlinkError(f"change {i} of the chain covers {sorted(changes)[:3]}…, the state {sorted(out)[:3]}…")
        out = {m: apply_change(out[m], changes[m]) for m in out}
    return out


def choose_chain(
    held: int | None, target: int, change_bytes: Mapping[int, int | None], dense_bytes: int
) -> list[int] | None:
    """Which versions' changes an agent downloads to reach `target`: `[]` when it is there,
    the versions `held+1 … target` when all are available and together smaller than the dense
    state, else None (download the dense state). `held` None: a new agent, which starts from
    version 0 (W_0 = 0, made locally). `change_bytes[v]`: size of the change to version v, None
    when it is gone."""
    start = 0 if held is None or held > target else held
    if start == target:
        return [] if held is not None or target == 0 else None
    versions = list(range(start + 1, target + 1))
    sizes = [change_bytes.get(v) for v in versions]
    if any(s is None for s in sizes):
        return None
    return versions if sum(s or 0 for s in sizes) < dense_bytes else None


def view_residual(W: Tensor, start: LoRAFactors, scale: float) -> Tensor:
    """The full view's base residual `W − s·B⁰A⁰ = W − trunc(W, r)` from the global update and
    the client's start factors (d_out, d_in), in W's dtype."""
    acc = torch.promote_types(W.dtype, torch.float32)
    return (W.to(acc) - scale * (start.B.to(W.device, acc) @ start.A.to(W.device, acc))).to(W.dtype)
