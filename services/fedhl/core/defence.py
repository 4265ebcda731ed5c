"""Bounds on what one upload can do to a round: pure functions over per-client numbers.

The strategy base class calls these for every strategy (STYLE.md item 11: a bound applied
around the algorithm, not a fork of it); the strategies only see the resulting coefficients.

Data sizes. A client's `n_examples` is its own claim. Before any weight is computed, every
claim is bounded by what the round's other clients claim: `n_i → min(n_i, size_k · med_j n_j)`
with `med` the lower median of the round's reported sizes, over every upload of the round
(`bounded_sizes`; `size_k=None`, the core's default, leaves sizes as reported; a job's
`defence.size_k` defaults to `SIZE_K` = 1: no client counts more than the median claim).
One client cannot move the lower median when N ≥ 3; with N = 2 it is the smaller claim (so
the larger is at most `size_k ×` the smaller), with N = 1 the client's own (its weight is 1
anyway). A liar among N clients thus holds at most `size_k · med / (size_k · med + Σ_{j≠i} n_j)`
of a data-size merge whatever it claims (2**63−1 included; `n_j` as counted), about
`size_k / (size_k + N − 1)`;
FedHL's `n_i / (e_i + ε)` scales it by the liar's own error. An honest client with more than
`size_k ×` the median is counted as `size_k ×` the median: at `size_k` 1 the upper half of the
round weighs as the median client (measured in bench/README.md: FedHL's clean loss improved,
FlexLoRA's rose 1.8 points in the regression). The bounded
sizes feed every weight that uses sizes (FedHL's `n_i / (e_i + ε)`, the baselines' data-size
weights, the non-LoRA parameters' average; HetLoRA's norm weights use none), once per round
over every upload (also one a module later leaves out), so every shard of a sharded merge
counts the same sizes; the round report names every clamped size (`sizes_bounded`: reported →
counted). The coordinator's edge still refuses
sizes above `max_examples_per_agent` or an admin-set `expected_examples`.

Weights. Every strategy then caps every client's weight at `max_weight_ratio / N` (N uploads
in the round, water-filled, renormalised; weights.cap_weights), for the LoRA factors and the
non-LoRA parameters alike: a second bound, from the participant count alone.

Update size, per module. Client i's update in module ℓ is what the strategy merges:
`Δ_i = s_i B_i' A_i' − s_i B_i⁰ A_i⁰` for the dense strategies (FedHL: `s_i B_i⁰ A_i⁰ =
trunc(W_t, r_i)`; FLoRA: `B_i⁰ = 0`), the factor change `(B_i' − B_i⁰, A_i' − A_i⁰)` for the
factor strategies (zero-padding, FedIT, HetLoRA), and `x_i − x_t` for a non-LoRA parameter.
Norms come from the factors in float64 (no dense product). With `bound = k · median_j ‖Δ_j‖`
(lower median over the module's sound uploads), an update above the bound is scaled by
`bound / ‖Δ_i‖` (`clip`, the default: an honest outlier keeps its direction and still counts)
or left out of that module (`reject`). HetLoRA's norm weights use `min(‖B_i A_i‖, k · median)`.
The decision is per module and uses only that module's uploads, so a worker that merges a
shard of the modules decides exactly what an unsharded merge decides.

Unsound uploads. Factors with NaN/Inf, an update norm that overflows float64, or factor
magnitudes that could overflow the compute dtype in the merge leave that upload out of that
module, by name; the others are merged with their weights recomputed over who is left. Only a
module with no upload left fails the round.

Far above the bound (`reject_k × median`, ClipConfig; the job's default 30) an update is
left out whatever the action, as `reject` would.

Strikes (the coordinator's quarantine counts them). An unsound upload (non-finite, overflow)
always counts. A bound action (clip or reject) counts only when the update is more than
`reject_k × median` (`is_strike`, default 30 > k = 3): an honest client at a larger rank
moves its factors further and can sit above `k × median` round after round (measured: up to
3.9 × median for a rank-32 client among ranks 2–32 under HetLoRA, bench/README.md), so a
clip alone says nothing about intent; ten times the median does.

Direction, per module (`min_cosine`; the core's default None: off; a job's
`defence.min_cosine` defaults to `MIN_COSINE` = −0.3). Each upload's update Δ_i (the Δ the
size bound uses) gets its cosine to the sum of the *other* uploads' unit-normalised updates,
`cos_i = ⟨u_i, Σ_{j≠i} u_j⟩ / ‖Σ_{j≠i} u_j‖` (`cosines_to_others`): every other upload counts
once whatever its norm or claimed size, and no upload is its own reference. Everything comes
from the N × N Gram matrix of the updates, in float64 and without a dense product for the
dense strategies (`⟨L_i R_i, L_j R_j⟩ = Σ (L_iᵀL_j) ⊙ (R_i R_jᵀ)` with Δ_i = s_i [B'−B⁰ | B⁰] @
[A'; A'−A⁰], `lowrank_gram`, O((d_out + d_in) K²) for K = Σ 2 r_i), from the flattened
zero-padded factor change for the factor strategies. A module is screened only when its round
has a direction: the lower median of its cosines `m > |min_cosine|`; then an upload with
`cos_i < min_cosine` is left out of that module (`update_against_round`, named with its
cosine; the others' weights are recomputed as for any leave-out). Never in a round of fewer
than 3 uploads (with two, each is the other's only reference), never half the round. The
non-LoRA parameters' cosines are measured and reported, never acted on: a small head moves
with each client's label skew (a 2-class bias changes along one line: honest cosines of ±1).
The decision uses one module's uploads only, so a sharded merge decides what an unsharded one
does. A direction leave-out counts a strike only when it hits at least
`DIRECTION_STRIKE_SHARE` (3/4) of the round's LoRA modules (`direction_strike`, judged where
the shards' reports are combined).

Measured (bench/README.md): on the known-optimum regression honest cosines run from +0.7 in
the first rounds to −0.38 near the optimum (honest updates cancel there: Σ p_i Δ_i ≈ 0), so
the median gate is what keeps honest clients in; on MiniLM honest per-module cosines sit near
0 (median 0.006, 5th percentile −0.23, max 0.41): honest clients' LoRA updates are nearly
orthogonal in weight space, the gate rarely opens, and a sign flip is not told apart from an
honest update there.

Validation (off unless a job's `defence.validation` names a server-held
labelled split: it needs data only the server has). Before the merge is committed, each upload's
leave-one-out effect on the validation loss, `e_i = L(all) − L(all but i)`, is measured with
the strategy's own merge (aggregation/validate.py: Zeno-style suspicion scoring, Xie et al.
2019, on the merge itself); upload i is left out of the whole round (`validation_loss_worse`,
module `*`, with `e_i` and the threshold) by one of two rules. The one-round rule (`window` 1,
`validation_outliers`): `e_i > max(margin, k · median_j |e_j|)`. The window rule (the default,
`validation_window_outliers`): each screened round t gives each of its uploads the evidence
`s_i,t = clip(e_i,t / median_j |e_j,t|, −cap, cap)`, 0 when `|e_i,t| ≤ margin`; upload i is left
out of round t when `Σ s_i,τ` over the job's rounds τ = t−w+1 … t that i took part in (a round
it missed, or one not screened, adds 0) is above `score`, *and* `e_i,t > margin` (it raises the
loss now: a past never takes away a helpful upload). With `cap < score` no one round decides:
an honest upload's bad round (4–12 medians on MiniLM, in clean runs) stays in, harm repeated
over rounds does not; helpful rounds count against harmful ones, so an honest agent's average
stays near or below zero. An agent new to the job is judged on the rounds it has: it needs
⌊score / cap⌋ + 1 harmful rounds at least (evidence required, not assumed: judging newcomers
by one round would bring back the one-round rule's honest leave-outs). An agent that behaves,
then turns, needs as many or more (its helpful rounds in the window count against it); one
that takes part in every other round is caught if its harmful rounds within the window still
sum above `score`. Both rules never act with fewer than `VALIDATION_MIN_CLIENTS` uploads, never
on half the round, never when an effect of the round is not finite; only harm counts (a
helpful outlier stays), the median keeps honest non-IID spread in. Such a leave-out is a
judgement of the whole upload, so it counts a strike (as a direction leave-out in most modules
does).

What it does not stop: an update inside the size bound whose direction is not clearly against
a round that agrees and whose harm on the server's split (validation screen on) does not stand
out from its round's (on MiniLM a sign flip costs 7–13 points without the validation screen;
with the window rule 0.6 at seed 0 under FedHL, and at seed 1 it was not caught by either rule:
its effects ran beside an honest agent's with its label skew, bench/README.md), though it
holds no more weight than an honest client at `size_k ×` the median size could; a colluding
majority (or half), which sets the medians.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ClipAction = Literal["clip", "reject"]
# a job's default size bound (JobSpec.defence.size_k): a reported size counts at most the round's
# median size (chosen on bench/robustness_mechanism.py, bench/README.md); the core's default is off
SIZE_K = 1.0
BOUND_REASONS = frozenset({"clipped", "update_norm_above_bound"})  # the update-size bound's two actions
# a job's default direction screen (JobSpec.defence.min_cosine): in a module whose median upload
# agrees with the others by more than 0.3, an upload whose cosine to the others is below −0.3 is
# left out of it (of −0.15, −0.2 and −0.3 the only one that left out no honest upload in the
# regression grid, any strategy or attack; bench/README.md)
MIN_COSINE = -0.3
DIRECTION_REASON = "update_against_round"  # the direction screen's action (a leave-out)
# the smallest round the direction screen acts in: with two clients, each is the other's only
# reference and a disagreement cannot say which of them is hostile
DIRECTION_MIN_CLIENTS = 3
# a direction leave-out counts a strike only when it hits at least this share of the round's
# LoRA modules: a sign flip is against the round everywhere, an honest outlier in a few modules
DIRECTION_STRIKE_SHARE = 0.75
VALIDATION_REASON = "validation_loss_worse"  # the validation screen's action (the whole upload left out)
# the smallest round the validation screen acts in: with two uploads, leaving one out is merging
# the other alone, and which of the two is hostile is not decided by a median of two
VALIDATION_MIN_CLIENTS = 3
# a job's default thresholds (JobSpec.defence.validation): an upload is harmful when leaving it out
# lowers the validation loss by more than max(VALIDATION_MARGIN, VALIDATION_K × the round's median
# |effect|) (MiniLM, seed 0, measured with the screen off, bench/README.md: the sign flip's adapter
# effects were 3.5-8.9 × the round's median in most rounds but only 0.003-0.05 in absolute terms
# under FlexLoRA, hence the low margin; honest effects of 0.07-0.34, 4-12 × the median, occurred
# too, in rounds where one honest upload did raise the loss: no threshold separates those)
VALIDATION_MARGIN = 0.01
VALIDATION_K = 3.0
# a job's default window rule (JobSpec.defence.validation; `window: 1` is the one-round rule
# above): an upload is left out when its effect, in multiples of its round's median |effect| and
# counted at most VALIDATION_CAP a round, sums to more than VALIDATION_SCORE over the job's last
# VALIDATION_WINDOW rounds, and it is harmful this round. Chosen on MiniLM seed 0 (screen off,
# bench/README.md): honest agents' sums there reached 3.0 at most, the sign flip's passed 5 from
# its second or third harmful round; cap < score, so no single round decides
VALIDATION_WINDOW = 5
VALIDATION_SCORE = 5.0
VALIDATION_CAP = 3.0


def check_min_cosine(c: float | None) -> float | None:
    """`min_cosine` (the direction screen's threshold) must be a number in [-1, 1] or None
    (off); −1 computes and reports the cosines but never acts."""
    if c is not None and not (isinstance(c, int | float) and math.isfinite(c) and -1.0 <= c <= 1.0):
        raise ValueError(f"min_cosine must be a number in [-1, 1] or None (off), got {c!r}")
    return c


def check_size_k(k: float | None) -> float | None:
    """`size_k` must be a finite number ≥ 1 or None (off)."""
    if k is not None and not (isinstance(k, int | float) and math.isfinite(k) and k >= 1):
        raise ValueError(f"size_k must be a finite number ≥ 1 or None (off), got {k!r}")
    return k


@dataclass(frozen=True)
class ClipConfig:
    """The update-size bound: `k × median` of the round's update norms, per module.

    `k=None` turns the bound off. `action`: `clip` scales an update above the bound down to
    it; `reject` leaves it out of the module. `reject_k` (≥ k; None: no such limit): an
    update above `reject_k × median` is left out whatever `action` says — a clip keeps the
    upload's weight, so an update a thousand times the median, clipped, still spends that
    weight on whatever direction it had (measured on MiniLM: a clipped ×1000 update kept the
    model at chance), while nothing honest comes near it.
    """

    k: float | None = 3.0
    action: ClipAction = "clip"
    reject_k: float | None = None

    def __post_init__(self) -> None:
        if self.k is not None and not (isinstance(self.k, int | float) and math.isfinite(self.k) and self.k >= 1):
            raise ValueError(f"clip k must be a finite number ≥ 1 or None (off), got {self.k!r}")
        if self.action not in ("clip", "reject"):
            raise ValueError(f"clip action must be 'clip' or 'reject', got {self.action!r}")
        r = self.reject_k
        if r is not None and not (isinstance(r, int | float) and math.isfinite(r) and r >= (self.k or 1)):
            raise ValueError(f"clip reject_k must be a finite number ≥ k ({self.k}) or None, got {r!r}")

    @property
    def enabled(self) -> bool:
        return self.k is not None

    @classmethod
    def off(cls) -> ClipConfig:
        return cls(k=None)


def lower_median(values: Sequence[float]) -> float:
    """The ⌈N/2⌉-th smallest value: with two clients it is the smaller one, so one of two
    cannot move the statistic (the mean of the middle two would let it)."""
    if not values:
        raise ValueError("median of no values")
    return sorted(values)[(len(values) - 1) // 2]


def bounded_sizes(sizes: Sequence[float], k: float | None) -> tuple[list[float], float]:
    """Every reported size clamped to `k ×` the round's lower median size, and that bound
    (inf with `k=None`: off). Server-side in the sense that matters: no single client's claim
    moves the bound when N ≥ 3, and with N ≤ 2 the bound follows the smaller claim."""
    if k is None or not sizes:
        return [float(n) for n in sizes], math.inf
    bound = k * float(lower_median([float(n) for n in sizes]))
    return [min(float(n), bound) for n in sizes], bound


def clip_bound(norms: Sequence[float], k: float) -> float:
    """`k · median(norms)`; inf (no bound) when the median is 0: a round whose typical client
    changed nothing gives no scale to bound the others by."""
    med = lower_median(norms)
    return k * med if med > 0 else math.inf


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings `norm` down to `bound` (1 when it is within)."""
    return 1.0 if norm <= bound else bound / norm


def overflow_limit(dtype: torch.dtype, count: int) -> float:
    """A magnitude that `count` terms of the merge can each reach without the sum overflowing
    `dtype` (with room for the state and the start-point terms)."""
    return float(torch.finfo(dtype).max) / (4.0 * max(count, 1))


def max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def product_may_overflow(B: Tensor, A: Tensor, scale: float, limit: float) -> bool:
    """True unless every entry (and every partial sum) of `scale · B @ A` is ≤ `limit`:
    |Σ_k s B_ik A_kj| ≤ r · s · max|B| · max|A|. Cheap (no product), and loose only for
    factors far beyond anything trained."""
    b, a = max_abs(B), max_abs(A)
    if not (math.isfinite(b) and math.isfinite(a)):
        return True
    r = B.shape[1]
    return b * scale > limit or a > limit or r * scale * b * a > limit


def bound_excess(norm: float, bound: float, k: float) -> float:
    """An upload's norm in multiples of its module's median, from `bound = k · median`."""
    return math.inf if bound <= 0 else norm * k / bound


def is_strike(reason: str, excess: float | None, reject_k: float | None) -> bool:
    """Whether one defence action counts toward quarantine. Unsound uploads and the validation
    screen's leave-outs (a whole upload judged harmful) always do; the
    update-size bound's actions (`clipped`, `update_norm_above_bound`) only when the update is
    above `reject_k × median` (`excess`; None: unknown, counts), never with `reject_k=None`.
    A direction leave-out never counts here: one module says little, `direction_strike` judges
    the round's modules together."""
    if reason == DIRECTION_REASON:
        return False  # judged over the whole round: direction_strike
    if reason not in BOUND_REASONS:
        return True
    if reject_k is None:
        return False
    return excess is None or excess > reject_k


# ---------------------------------------------------------------------------------- direction
def lowrank_gram(Ls: Sequence[Tensor], Rs: Sequence[Tensor]) -> Tensor:
    """Gram matrix `G_ij = ⟨L_i R_i, L_j R_j⟩_F` (N, N) in float64 without any dense product:
    `⟨L_i R_i, L_j R_j⟩ = tr(R_iᵀ L_iᵀ L_j R_j) = Σ (L_iᵀ L_j) ⊙ (R_i R_jᵀ)`, from one (K, K)
    Gram of the concatenated left factors and one of the right ones (K = Σ k_i inner sizes).
    Cost O((d_out + d_in) K²): for K well below min(d_out, d_in) less than forming the dense
    updates (O(d_out d_in K))."""
    if not Ls:
        return torch.zeros(0, 0, dtype=torch.float64)
    dev = Ls[0].device
    L = torch.cat([x.to(dev, torch.float64) for x in Ls], dim=1)  # (d_out, K)
    R = torch.cat([x.to(dev, torch.float64) for x in Rs], dim=0)  # (K, d_in)
    P = (L.mT @ L) * (R @ R.mT)  # (K, K)
    owner = torch.repeat_interleave(
        torch.arange(len(Ls), device=dev), torch.tensor([x.shape[1] for x in Ls], device=dev)
    )
    E = torch.nn.functional.one_hot(owner, len(Ls)).to(torch.float64)  # (K, N): inner column → client
    return (E.mT @ P @ E).cpu()  # (N, N)


def lowrank_cosines_to_others(Ls: Sequence[Tensor], Rs: Sequence[Tensor]) -> list[float]:
    """`cosines_to_others` of the updates `L_i R_i`, by the cheaper of two exact routes: the
    Gram matrix (`lowrank_gram`, O((d_out + d_in) K²)) while K = Σ k_i is below
    d_out·d_in / (d_out + d_in), else through the dense sum of the unit updates `S = Σ_j u_j`
    (O(d_out d_in K), the cost of the merge's own GEMM): `⟨u_i, Σ_{j≠i} u_j⟩ = ⟨u_i, S⟩ − 1` and
    `‖Σ_{j≠i} u_j‖² = ‖S‖² − 2⟨u_i, S⟩ + 1`. Both in float64."""
    if not Ls:
        return []
    d_out, d_in = Ls[0].shape[0], Rs[0].shape[1]
    K = sum(x.shape[1] for x in Ls)
    if K * (d_out + d_in) <= d_out * d_in:
        return cosines_to_others(lowrank_gram(Ls, Rs))
    dev, wide = Ls[0].device, torch.float64
    sq = [
        float(((L.to(dev, wide).mT @ L.to(dev, wide)) * (R.to(dev, wide) @ R.to(dev, wide).mT)).sum())
        for L, R in zip(Ls, Rs, strict=True)
    ]
    norms = [math.sqrt(max(v, 0.0)) for v in sq]
    S = torch.zeros(d_out, d_in, dtype=wide, device=dev)  # (d_out, d_in) Σ_j u_j
    for L, R, nj in zip(Ls, Rs, norms, strict=True):
        if nj > 0:
            S.addmm_(L.to(dev, wide), R.to(dev, wide), alpha=1.0 / nj)
    total = float((S * S).sum())  # ‖S‖²
    out = []
    for L, R, ni in zip(Ls, Rs, norms, strict=True):
        if ni == 0:
            out.append(0.0)
            continue
        dot = float(((L.to(dev, wide).mT @ S) * R.to(dev, wide)).sum()) / ni  # ⟨u_i, S⟩; (k, d_in)
        ref_sq = total - 2 * dot + 1.0
        out.append(max(-1.0, min(1.0, (dot - 1.0) / math.sqrt(ref_sq))) if ref_sq > 1e-24 else 0.0)
    return out


def vector_gram(vs: Sequence[Tensor]) -> Tensor:
    """`G_ij = ⟨v_i, v_j⟩` (N, N) in float64 for flattened updates (factor changes, extras)."""
    if not vs:
        return torch.zeros(0, 0, dtype=torch.float64)
    V = torch.stack([v.reshape(-1).to(vs[0].device, torch.float64) for v in vs])  # (N, D)
    return (V @ V.mT).cpu()


def cosines_to_others(gram: Tensor) -> list[float]:
    """Each client's cosine to the sum of the *other* clients' unit-normalised updates,
    `cos_i = ⟨u_i, Σ_{j≠i} u_j⟩ / ‖Σ_{j≠i} u_j‖` with `u_j = Δ_j / ‖Δ_j‖`, from the Gram matrix
    alone: with `C` the cosine matrix, `⟨u_i, Σ_{j≠i} u_j⟩ = Σ_{j≠i} C_ij` and
    `‖Σ_{j≠i} u_j‖² = Σ_{j,k≠i} C_jk`. Every other client counts once whatever its norm or
    size (a large or heavily weighted update cannot pull the reference), and a client is never
    its own reference. A zero update, or one whose others sum to zero, gets 0 (no direction)."""
    G = gram.to(torch.float64)
    n = G.shape[0]
    if n < 2:
        return [0.0] * n
    norm = G.diagonal().clamp_min(0).sqrt()  # (N,)
    ok = norm > 0
    inv = torch.where(ok, 1.0 / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    C = G * inv[:, None] * inv[None, :]  # (N, N) cosines; rows/cols of zero updates are 0
    row = C.sum(1)  # Σ_j C_ij
    diag = C.diagonal()
    num = row - diag  # ⟨u_i, Σ_{j≠i} u_j⟩
    ref_sq = C.sum() - 2 * row + diag  # ‖Σ_{j≠i} u_j‖²
    out = []
    for i in range(n):
        r = float(ref_sq[i])
        out.append(float(num[i]) / math.sqrt(r) if bool(ok[i]) and r > 1e-24 else 0.0)
    return [max(-1.0, min(1.0, c)) for c in out]


def direction_threshold(cosines: Sequence[float], min_cosine: float | None) -> float:
    """The cosine below which an upload is against its round, in one module: `min_cosine`, when
    the round has a direction, i.e. its typical upload agrees with the others by more than
    `|min_cosine|` (lower median of the cosines `m > |min_cosine|`); else −inf (no screen).
    Also −inf when the screen is off or with fewer than `DIRECTION_MIN_CLIENTS` uploads. The
    gate matters: near a stationary point honest updates cancel (Σ p_i Δ_i ≈ 0 makes every
    cosine to the others negative; measured down to −0.38 in bench/README.md), and there a
    sign flip is no worse than the honest spread either. A colluding half sets `m` and turns
    the screen off."""
    if min_cosine is None or len(cosines) < DIRECTION_MIN_CLIENTS:
        return -math.inf
    return min_cosine if lower_median(cosines) > abs(min_cosine) else -math.inf


def direction_outliers(cosines: Sequence[float], min_cosine: float | None) -> list[int]:
    """Positions whose cosine to the others is below `direction_threshold`, lowest first, at
    most ⌊(N−1)/2⌋ of them (the screen assumes an honest majority and never leaves out half
    the round)."""
    t = direction_threshold(cosines, min_cosine)
    below = sorted((c, i) for i, c in enumerate(cosines) if c < t)
    return [i for _, i in below[: (len(cosines) - 1) // 2]]


def direction_strike(modules_left_out: int, modules: int) -> bool:
    """Whether a client left out by the direction screen in `modules_left_out` of the round's
    `modules` LoRA modules counts a strike: only in at least `DIRECTION_STRIKE_SHARE` of them."""
    return modules > 0 and modules_left_out >= DIRECTION_STRIKE_SHARE * modules


# --------------------------------------------------------------------------------- validation
def check_validation_rule(margin: float, k: float) -> None:
    """The validation screen's thresholds: `margin` ≥ 0 and `k` ≥ 1, both finite."""
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"validation margin must be a finite number ≥ 0, got {margin!r}")
    if not (isinstance(k, int | float) and math.isfinite(k) and k >= 1):
        raise ValueError(f"validation k must be a finite number ≥ 1, got {k!r}")


def validation_threshold(effects: Sequence[float], margin: float, k: float) -> float:
    """The effect above which an upload is harmful: `max(margin, k · median_j |e_j|)` (lower
    median over the round's effects, so one upload cannot move it when N ≥ 3); inf (no screen)
    with fewer than `VALIDATION_MIN_CLIENTS` effects or any effect that is not finite."""
    if len(effects) < VALIDATION_MIN_CLIENTS or not all(math.isfinite(e) for e in effects):
        return math.inf
    return max(margin, k * lower_median([abs(e) for e in effects]))


def validation_outliers(effects: Sequence[float], margin: float, k: float) -> list[int]:
    """Positions whose leave-one-out effect `e_i = L(all) − L(all but i)` (how much leaving
    upload i out lowers the validation loss) is above `validation_threshold`, largest first,
    at most ⌊(N−1)/2⌋ of them (an honest majority; never half the round). A tie with the
    threshold stays in (strictly above only)."""
    t = validation_threshold(effects, margin, k)
    above = sorted(((-e, i) for i, e in enumerate(effects) if e > t))
    return [i for _, i in above[: (len(effects) - 1) // 2]]


def validation_evidence(effects: Mapping[str, float], margin: float, cap: float) -> dict[str, float]:
    """One screened round's evidence per upload: its effect in multiples of the round's lower
    median |effect|, clipped to [−cap, cap] (one round, however extreme, counts at most `cap`),
    and 0 when |e_i| ≤ margin (an effect the split cannot resolve is no evidence either way).
    Empty for a round the one-round rule would not screen (fewer than `VALIDATION_MIN_CLIENTS`
    effects, or any not finite): such a round says nothing about anyone."""
    values = list(effects.values())
    if len(values) < VALIDATION_MIN_CLIENTS or not all(math.isfinite(e) for e in values):
        return {}
    med = lower_median([abs(e) for e in values])
    out: dict[str, float] = {}
    for c, e in effects.items():
        z = (math.copysign(math.inf, e) if med == 0 else e / med) if abs(e) > margin else 0.0
        out[c] = min(cap, max(-cap, z))
    return out


def validation_window_scores(
    effects: Mapping[str, float], history: Sequence[Mapping[str, float]], margin: float, cap: float
) -> dict[str, float]:
    """Each current upload's score over the window: its evidence this round plus its evidence
    in each earlier round of `history` (the job's previous rounds' effects, one mapping per
    round; a round it did not take part in, or that was not screened, adds 0). Empty when the
    current round cannot be screened."""
    now = validation_evidence(effects, margin, cap)
    if not now:
        return {}
    past = [validation_evidence(h, margin, cap) for h in history]
    return {c: s + sum(p.get(c, 0.0) for p in past) for c, s in now.items()}


def validation_window_outliers(
    effects: Mapping[str, float],
    history: Sequence[Mapping[str, float]],
    margin: float,
    score: float,
    cap: float,
) -> list[str]:
    """The windowed rule: upload i is left out when its summed evidence over the window
    (`validation_window_scores`: this round and the job's previous rounds in `history`) is
    above `score` *and* its own effect this round is harmful (`e_i > margin`: an upload that
    does not raise the loss now is never taken away for its past). Largest score first, ties
    in upload order, at most ⌊(N−1)/2⌋ of the round; strictly above only. With `cap ≤ score`
    no single round decides: an honest upload's one bad round (seen at 4–12 × the median on
    MiniLM) stays in, an upload that hurts round after round does not; an agent new to the job
    is judged on the rounds it has (its window starts empty: evidence is required, not
    assumed). An empty `history` and `cap > score` give the one-round rule with `k = score`."""
    scores = validation_window_scores(effects, history, margin, cap)
    clients = list(effects)
    above = sorted(
        (-scores[c], i) for i, c in enumerate(clients) if scores and scores[c] > score and effects[c] > margin
    )
    return [clients[i] for _, i in above[: (len(clients) - 1) // 2]]
