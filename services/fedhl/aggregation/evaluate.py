"""The held-out evaluation a round's commit records: accuracy/loss (classification) or
loss/perplexity (causal LM) of W0 + W_t, every `evaluation.every` rounds. A measurement: an
error is reported in the round report and never fails the round."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..core import GlobalState, Strategy
from ..jobspec import JobSpec

log = logging.getLogger(__name__)

_CACHE: dict[tuple[str, str, int], tuple[Any, Any, list[Any]]] = {}


def evaluate_state(strategy: Strategy, state: GlobalState, spec: JobSpec) -> dict[str, Any] | None:
    ev = spec.evaluation
    if ev.path is None or state.round % ev.every != 0:
        return None
    t0 = time.perf_counter()
    try:
        from ..data import load_examples
        from ..evaluation import evaluate
        from ..export import effective_updates
        from ..modeling import load_base

        key = (spec.base_model, ev.path, spec.num_labels)
        if key not in _CACHE:
            _CACHE.clear()  # one base model in memory at a time
            model, tok = load_base(spec.base_model, spec.task_type, spec.num_labels, init_seed=spec.seed)
            _CACHE[key] = (model, tok, load_examples(ev.path, spec.task_type, spec.num_labels))
        model, tok, examples = _CACHE[key]
        updates = effective_updates(strategy, state)
        out: dict[str, Any] = evaluate(
            (model, tok),
            spec.task_type,
            spec.num_labels,
            updates,
            state.extras,
            examples,
            max_seq_len=spec.train.max_seq_len,
        )
    except Exception as e:  # evaluation is a measurement: report the error, keep the round
        log.exception("evaluation of round %d failed", state.round)
        return {"error": f"{type(e).__name__}: {e}"}
    return {**out, "examples": len(examples), "seconds": time.perf_counter() - t0}
