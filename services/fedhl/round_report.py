"""The round report: what one round's merge did, as stored on the round, served by the REST
API, printed by the demo and written by `fedhl simulate`. One shape, one owner.

A sharded aggregation writes one partial report per shard (`partial`); the commit combines
them (`RoundReport.combine`) into the report an unsharded merge would give."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .core import AggregationReport, Strategy, effective_participants
from .core.defence import DIRECTION_REASON, bound_excess, direction_strike, is_strike


class RoundReportError(ValueError):
    """A stored report does not have the round report's shape."""


@dataclass
class RoundReport:
    strategy: str
    round: int
    clients: list[str]
    weights: dict[str, float]  # scalar weight per client (mean over modules if per-module)
    truncation_errors: dict[str, float]
    energy_kept: dict[str, float]  # rank (str) -> fraction of ‖W_t‖²_F kept at that rank
    update_norms: dict[str, float]
    global_update_norm: float | None  # None: not a number
    n_eff: float  # 1 / Σ p_i²
    module_weights: dict[str, dict[str, float]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    svd: dict[str, Any] = field(default_factory=dict)  # methods, worst residual, seconds
    timings: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None  # held-out metrics, on evaluation rounds only
    # what the defences did (core/defence.py): weights after caps, drops and clip scales, and
    # every dropped or clipped upload with its agent, module and reason
    effective_weights: dict[str, float] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    clipped: list[dict[str, Any]] = field(default_factory=list)
    # reported data sizes above `size_k ×` the round's median, counted as that bound
    sizes_bounded: list[dict[str, Any]] = field(default_factory=list)
    # what the next round's agents download (`downlink_summary`); empty in older reports
    downlink: dict[str, Any] = field(default_factory=dict)
    # the validation screen's measurements (aggregation/validate.py: loss with every upload,
    # each upload's leave-one-out effect, the threshold, who was left out, seconds); None: off
    validation: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        report: AggregationReport,
        timings: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        validation: dict[str, Any] | None = None,
    ) -> RoundReport:
        return cls(**report.to_dict(), timings=dict(timings or {}), evaluation=evaluation, validation=validation)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("evaluation", "validation"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundReport:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise RoundReportError(f"unexpected round report fields: {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise RoundReportError(f"not a round report: {e}") from None

    @classmethod
    def combine(cls, parts: list[dict[str, Any]], shards_s: list[float]) -> RoundReport:
        """One round report from the shards' partial ones (weights averaged over all modules)."""
        first = parts[0]
        n_modules = sum(p["n_modules"] for p in parts)
        clients = first["clients"]
        weights = {c: sum(p["weights_sum"][c] for p in parts) / n_modules for c in clients}
        effective = {c: sum(p["effective_sum"].get(c, 0.0) for p in parts) / n_modules for c in clients}
        module_weights: dict[str, Any] | None = None
        if first["module_weights"] is not None:
            module_weights = {}
            for p in parts:
                module_weights.update(p["module_weights"])
        timings = {k: sum(p["timings"][k] for p in parts) for k in first["timings"]}
        return cls(
            strategy=first["strategy"],
            round=first["round"],
            clients=clients,
            weights=weights,
            truncation_errors=first["truncation_errors"],
            energy_kept=first["energy_kept"],
            update_norms={c: math.sqrt(sum(p["update_sq"][c] for p in parts)) for c in clients},
            global_update_norm=math.sqrt(sum(p["change_sq"] for p in parts)),
            n_eff=effective_participants(list(weights.values())),
            module_weights=module_weights,
            options=first["options"],
            svd=first["svd"],
            timings={**timings, "shards": len(parts), "max_shard_s": max(shards_s), "device": first["device"]},
            effective_weights=effective,
            dropped=[d for p in parts for d in p["dropped"]],
            clipped=[c for p in parts for c in p["clipped"]],
            sizes_bounded=first.get("sizes_bounded", []),  # every shard bounds the same sizes
            validation=first.get("validation"),  # a screened round has one shard
        )

    def offences(self) -> dict[str, list[str]]:
        """Agent → the reasons its upload was dropped or clipped in some module (sorted, unique).
        A bounded size is not an offence: under the default `size_k` = 1 every agent above the
        round's median size is bounded every round; `sizes_bounded` in the report names them."""
        out: dict[str, set[str]] = {}
        for d in self.dropped:
            out.setdefault(d["client"], set()).add(d["reason"])
        for c in self.clipped:
            out.setdefault(c["client"], set()).add("clipped")
        return {a: sorted(r) for a, r in sorted(out.items())}

    def struck(self, clip_k: float | None, reject_k: float | None, modules: int = 0) -> set[str]:
        """Agents with an offence that counts a strike (core/defence.py `is_strike`): any drop
        of an unsound upload; a clip or reject only above `reject_k × median` in some module;
        the direction screen's leave-outs only in at least `DIRECTION_STRIKE_SHARE` of the
        round's `modules` LoRA modules (`direction_strike`; 0: never)."""
        out: set[str] = set()
        against: dict[str, int] = {}
        for d in self.dropped:
            if d["reason"] == DIRECTION_REASON and not str(d["module"]).startswith("extra::"):
                against[d["client"]] = against.get(d["client"], 0) + 1
        out |= {c for c, k in against.items() if direction_strike(k, modules)}
        for d in self.dropped:
            norm, bound = d.get("norm"), d.get("bound")
            ok = clip_k is not None and norm is not None and bound is not None
            excess = bound_excess(norm, bound, clip_k) if ok else None  # type: ignore[arg-type]
            if is_strike(d["reason"], excess, reject_k):
                out.add(d["client"])
        for c in self.clipped:
            excess = bound_excess(c["norm"], c["bound"], clip_k) if clip_k is not None else None
            if is_strike("clipped", excess, reject_k):
                out.add(c["client"])
        return out


def downlink_summary(strategy: Strategy, sizes: dict[str, int]) -> dict[str, Any]:
    """The client view and the bytes the next round's agents download per rank class.

    `sizes`: "start:<rank>" (start package), "state" (the dense global state), "change" (the
    round's factored change, factored downlink only). `per_rank_bytes` is what an agent that
    holds the previous version downloads: its start package, plus the change under a factored
    downlink; a new or lagging agent downloads its start package plus a chain of changes or the
    dense state, whichever the coordinator finds smaller."""
    starts = {k.split(":", 1)[1]: v for k, v in sizes.items() if k.startswith("start:")}
    change = sizes.get("change")
    factored = strategy.factored_downlink
    return {
        "client_view": str(strategy.options().get("client_view", "n/a")),
        "factored": factored,
        "start_bytes": starts,
        "change_bytes": change,
        "state_bytes": sizes.get("state"),
        "per_rank_bytes": {r: v + ((change or 0) if factored else 0) for r, v in starts.items()},
    }


def partial(
    report: AggregationReport,
    n_modules: int,
    timings: dict[str, float],
    device: str,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One shard's part of the round report (JSON-safe): sums that `RoundReport.combine` adds up.
    Truncation errors, energy and SVD figures come from the spectra of *all* modules, so every
    shard carries the whole-round values; `validation`: the screen's summary (one shard)."""
    return {
        "validation": validation,
        "strategy": report.strategy,
        "round": report.round,
        "clients": report.clients,
        "n_modules": n_modules,
        "weights_sum": {c: w * n_modules for c, w in report.weights.items()},
        "effective_sum": {c: w * n_modules for c, w in report.effective_weights.items()},
        "dropped": [asdict(d) for d in report.dropped],
        "clipped": [asdict(c) for c in report.clipped],
        "sizes_bounded": [asdict(r) for r in report.sizes_bounded],
        "update_sq": {c: v * v for c, v in report.update_norms.items()},
        "change_sq": report.global_update_norm**2,
        "truncation_errors": report.truncation_errors,
        "energy_kept": {str(k): v for k, v in report.energy_kept.items()},
        "module_weights": report.module_weights,
        "options": report.options,
        "svd": report.svd,
        "timings": timings,
        "device": device,
    }
