"""The held-out evaluation a round's commit records: accuracy/loss (classification) or
loss/perplexity (causal LM) of W0 + W_t, every `evaluation.every` rounds. A measurement: an
error is reported in the round report and never fails the round.

The base model (W0) and the examples of each server-side split are read once per process and
kept (`cached_base`, `cached_examples`): the evaluation and the validation screen
(aggregation/validate.py) share one copy of the base model."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..core import GlobalState, Strategy
from ..data import Example
from ..jobspec import JobSpec

log = logging.getLogger(__name__)

_BASE: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_EXAMPLES: dict[tuple[str, str, int], list[Example]] = {}
MAX_CACHED_SPLITS = 4


def cached_base(spec: JobSpec) -> tuple[Any, Any]:
    """(model, tokenizer) holding W0 for the job's base model; one base model in memory at a time."""
    from ..modeling import load_base

    key = (spec.base_model, spec.task_type, spec.num_labels)
    if key not in _BASE:
        _BASE.clear()
        _BASE[key] = load_base(spec.base_model, spec.task_type, spec.num_labels, init_seed=spec.seed)
    return _BASE[key]


def cached_examples(path: str, spec: JobSpec) -> list[Example]:
    """The examples of a server-side split (raises `fedhl.data.DataError` on a bad file)."""
    from ..data import load_examples

    key = (path, spec.task_type, spec.num_labels)
    if key not in _EXAMPLES:
        if len(_EXAMPLES) >= MAX_CACHED_SPLITS:
            _EXAMPLES.clear()
        _EXAMPLES[key] = load_examples(path, spec.task_type, spec.num_labels)
    return _EXAMPLES[key]


def evaluate_state(strategy: Strategy, state: GlobalState, spec: JobSpec) -> dict[str, Any] | None:
    ev = spec.evaluation
    if ev.path is None or state.round % ev.every != 0:
        return None
    t0 = time.perf_counter()
    try:
        from ..evaluation import evaluate
        from ..export import effective_updates

        model, tok = cached_base(spec)
        examples = cached_examples(ev.path, spec)
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
