"""The validation screen (`defence.validation`): judge each upload by what it does to the model
on a small labelled split the server holds, and leave out the ones that clearly make it worse.

Leave-one-out influence, as in Zeno (Xie, Koyejo, Gupta 2019, "Zeno: Distributed Stochastic
Gradient Descent with Suspicion-based Fault-tolerance": score each worker's update by the
loss decrease it brings on a validation batch held by the server) but measured on the merge
itself rather than on a gradient step: with `M(S)` the round's merge of the uploads in S (the
job's strategy code, the weights recomputed over who is in S exactly as any leave-out
recomputes them; reported sizes still bounded over the whole round) and `L` the mean loss of
`W0 + M(S)` on the validation split,

    e_i = L(M(all)) − L(M(all but i))        (> 0: leaving upload i out lowers the loss)

and upload i is left out of the round by the job's rule (core/defence.py). The window rule (the
default, `validation_window_outliers`): when its effects over the job's last `window` rounds,
each in multiples of its round's median |effect| and counted within ±cap, sum to more than
`score`, and it raises the loss this round by more than `margin`. The one-round rule (`window:
1`, `validation_outliers`): when `e_i > max(margin, k · median_j |e_j|)`. Both never with fewer
than 3 uploads, at most ⌊(N−1)/2⌋, largest first, strictly above; under the window rule each
candidate after the first is re-measured against the merge without the ones already out and
left out only if it still raises the loss there by more than `margin` (an honest agent whose
effect came from the flip it shares the round with stays; summary `rechecked`). The median keeps honest
non-IID spread in: an honest upload that pulls the model toward its own label skew usually
moves the loss by about as much as the others do. The window is there because one round
cannot tell a hostile upload from an honest one that hurt this round (MiniLM, bench/README.md:
honest single-round effects of 4–12 medians in clean runs; the flip at seed 1 beside an honest
agent with its label skew), while over rounds the two differ: the flip hurts round after round,
an honest agent's bad rounds are isolated and offset by helpful ones. What cannot be seen:
harm within the honest spread round after round, harm on inputs the split does not cover, a
colluding half of the round (it sets the median and the minority bound). A leave-out is a
strike like any other.

History: the effects of the window's earlier rounds come from those rounds' summaries
(`window_history`): the aggregation worker reads them from the job's committed round reports
(`validation`, one query per round: aggregation/inputs.py), `fedhl simulate` keeps them in
memory; the same summaries give the same decision. A round that failed, or was not screened,
gives no evidence. In the coordinator a failed round is retried under its number;
`simulate(keep_going=True)` (the benchmarks) moves on, so there it is a gap in the window.

Cost: N + 1 merges and N + 1 forward passes (no_grad) over at most `max_examples` examples per
round, on the aggregating worker's device; the seconds are in the round report
(`validation.seconds`). The base model and the split are read once per process
(aggregation/evaluate.py's cache).

Where it runs: `fedhl simulate` and the aggregation worker call `validation_screen` with the
round's start state, plan and uploads, then merge with `left_out` (Strategy.aggregate): one
decision per round, before the merge that is committed. It needs the whole model, so a job
with a screen is aggregated in one task per round (the scheduler gives it one shard whatever
`aggregation_shards` says; a sharded round of such a job fails with the reason).

Never on the test split the reported accuracy uses: the screen would then choose the uploads
that score best on the figure it reports (JobSpec refuses `defence.validation.path ==
evaluation.path`). A split that cannot be read fails the round with the reason (a defence the
job asked for is not silently skipped); a round of fewer than 3 uploads is not screened.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import AggregationError, ClientUpdate, DropRecord, GlobalState, RoundPlan, Strategy
from ..core.defence import (
    VALIDATION_MIN_CLIENTS,
    VALIDATION_REASON,
    validation_outliers,
    validation_threshold,
    validation_window_outliers,
    validation_window_scores,
)
from ..data import DataError, Example
from ..evaluation import evaluate
from ..export import effective_updates
from ..jobspec import JobSpec
from .evaluate import cached_base, cached_examples

log = logging.getLogger(__name__)

LOSS_CAP = 1e30  # a loss that is not finite (a model the merge blew up) counts as this
SCOPES = ("upload", "adapters")


@dataclass(frozen=True)
class Screen:
    """One round's decision: the uploads to leave out (records for `Strategy.aggregate`'s
    `left_out`) and what was measured (the round report's `validation`)."""

    left_out: list[DropRecord] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def history_rounds(spec: JobSpec, number: int) -> range:
    """The earlier rounds the window rule reads for round `number`: the job's previous
    `window − 1` round numbers (none for the one-round rule or a job without a screen)."""
    cfg = spec.defence.validation
    w = 1 if cfg is None else cfg.window
    return range(max(0, number - w + 1), number)


def window_history(summaries: Sequence[Mapping[str, Any] | None]) -> list[dict[str, float]]:
    """The effects of earlier rounds from their `validation` summaries (as stored in the round
    reports), one mapping per round; `{}` for a round without a summary (not committed, failed)
    or not screened (skipped, merge failed). `fedhl simulate` and the aggregation worker both
    build the window rule's history with this, from the same summaries."""
    out: list[dict[str, float]] = []
    for v in summaries:
        effects = (v or {}).get("effects")
        out.append({str(c): float(e) for c, e in effects.items()} if isinstance(effects, dict) else {})
    return out


def validation_examples(spec: JobSpec) -> list[Example]:
    """The first `max_examples` examples of the job's validation split; AggregationError naming
    the path when it cannot be read."""
    cfg = spec.defence.validation
    if cfg is None:
        return []
    try:
        return cached_examples(cfg.path, spec)[: cfg.max_examples]
    except DataError as e:
        raise AggregationError(f"validation screen: defence.validation.path cannot be used: {e}") from None


@torch.no_grad()
def validation_screen(
    strategy: Strategy,
    state: GlobalState,
    plan: RoundPlan,
    updates: Sequence[ClientUpdate],
    spec: JobSpec,
    *,
    history: Sequence[Mapping[str, float]] = (),
    base: tuple[Any, Any] | None = None,
    device: torch.device | str = "cpu",
) -> Screen:
    """The round's validation screen (module docstring). `state` holds the whole start state
    (every module), `updates` every upload; neither is changed. `history`: the effects of the
    job's earlier rounds in the window (`window_history`, oldest first; read only when
    `window` > 1). `base`: (model, tokenizer)
    holding W0 (`fedhl simulate` passes its own; else the process's cached copy). Raises
    AggregationError when the split cannot be read; a merge that fails here is reported and
    left to the real merge (which fails the round with its own reason)."""
    cfg = spec.defence.validation
    if cfg is None:
        return Screen()
    t0 = time.perf_counter()
    examples = validation_examples(spec)
    clients = [u.client_id for u in updates]
    summary: dict[str, Any] = {"examples": len(examples), "act": cfg.act, "margin": cfg.margin, "k": cfg.k}
    if cfg.window > 1:
        summary.update(window=cfg.window, score=cfg.score, cap=cfg.cap)
    if len(updates) < VALIDATION_MIN_CLIENTS:
        summary.update(skipped=f"{len(updates)} upload(s): the screen needs {VALIDATION_MIN_CLIENTS}")
        summary["seconds"] = time.perf_counter() - t0
        return Screen([], summary)
    model_tok = base if base is not None else cached_base(spec)
    scopes = [cfg.scope] if cfg.act else list(SCOPES)  # measuring only: both scopes, for the record

    def loss(merged: GlobalState, extras: GlobalState) -> float:
        out = evaluate(
            model_tok,
            spec.task_type,
            spec.num_labels,
            effective_updates(strategy, merged),
            extras.extras,
            examples,
            max_seq_len=spec.train.max_seq_len,
            device=device,
        )
        value = float(out["loss"])
        return value if math.isfinite(value) else LOSS_CAP

    by_scope: dict[str, dict[str, float]] = {sc: {} for sc in scopes}
    try:
        every, _ = strategy.aggregate(state, plan, updates)
        l_all = loss(every, every)
        for c in clients:
            try:
                without, _ = strategy.aggregate(state, plan, updates, left_out=[DropRecord(c, "*", VALIDATION_REASON)])
            except AggregationError as e:  # e.g. the others were all left out of some module
                log.info("validation screen: merge without %s failed: %s", c, e)
                for sc in scopes:
                    by_scope[sc][c] = math.nan
                continue
            for sc in scopes:  # "adapters": the non-LoRA parameters stay as merged from every upload
                by_scope[sc][c] = l_all - loss(without, without if sc == "upload" else every)
            del without
    except AggregationError as e:
        summary.update(error=f"merge failed: {e}", seconds=time.perf_counter() - t0)
        return Screen([], summary)
    finally:
        for m in state.modules:  # the screen's merges leave FedHL's downlink change behind: drop it
            strategy.round_change(plan, m)
    effects = by_scope[cfg.scope]
    n = len(examples)
    scores: dict[str, float] = {}
    if cfg.window == 1:
        t = validation_threshold([effects[c] for c in clients], cfg.margin, cfg.k)
        picked = validation_outliers([effects[c] for c in clients], cfg.margin, cfg.k) if cfg.act else []
        out = [clients[i] for i in picked]
        why = {
            c: f"leaving it out lowers the validation loss by {effects[c]:.4g} > {t:.4g} (max({cfg.margin:g}, "
            f"{cfg.k:g} × the round's median |effect|); {n} examples)"
            for c in out
        }
    else:
        scores = validation_window_scores(effects, history, cfg.margin, cfg.cap)
        t = cfg.score if scores else math.inf
        candidates = validation_window_outliers(effects, history, cfg.margin, cfg.score, cfg.cap) if cfg.act else []
        rechecked: dict[str, float] = {}
        out = []
        try:
            for c in candidates:  # largest score first
                if out:  # harmful to the merge without the ones already out? (the first one is, by its effect)
                    gone = [DropRecord(x, "*", VALIDATION_REASON) for x in out]
                    kept, _ = strategy.aggregate(state, plan, updates, left_out=gone)
                    less, _ = strategy.aggregate(
                        state, plan, updates, left_out=[*gone, DropRecord(c, "*", VALIDATION_REASON)]
                    )
                    heads = (kept, less) if cfg.scope == "upload" else (every, every)
                    rechecked[c] = loss(kept, heads[0]) - loss(less, heads[1])
                    del kept, less
                    if not rechecked[c] > cfg.margin:
                        continue
                out.append(c)
        except AggregationError as e:  # as for any leave-out merge: keep what was decided
            log.info("validation screen: re-check merge failed: %s", e)
        finally:
            for m in state.modules:
                strategy.round_change(plan, m)
        if rechecked:
            summary["rechecked"] = rechecked
        why = {
            c: f"leaving it out lowers the validation loss by {effects[c]:.4g} this round, and its effects over "
            f"the last {cfg.window} rounds sum to {scores[c]:.4g} > {t:g} round medians (each within "
            f"±{cfg.cap:g}; {n} examples)"
            for c in out
        }
        summary.update(scores=scores, history=sum(1 for h in history if h))
    records = [
        DropRecord(c, "*", VALIDATION_REASON, why[c], effect=effects[c], threshold=t, score=scores.get(c)) for c in out
    ]
    summary.update(
        loss_all=l_all,
        effects=effects,
        scope=cfg.scope,
        **({"effects_by_scope": by_scope} if len(scopes) > 1 else {}),
        threshold=t if math.isfinite(t) else None,
        left_out=[r.client for r in records],
        seconds=time.perf_counter() - t0,
    )
    return Screen(records, summary)
