"""Evaluation of the served model `W0 + W_t` (ALGORITHMS.md, "Details every strategy
shares"): the dense effective update is added to the listed module weights of a fresh copy
of the base model and the head is set from `extras`; no peft involved. `evaluate_model`
runs any model (a plain transformers model or a peft one) over examples, and is what the
server and the agents both use, so their numbers are comparable.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import Example, batches, encode_batch, summed_loss
from .modeling import add_to_weights, load_base, set_parameters


@torch.no_grad()
def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task_type: str,
    batch_size: int = 32,
    max_seq_len: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """seq_cls: {"accuracy", "loss"} (mean cross-entropy per example); causal_lm: {"loss",
    "perplexity"} (mean cross-entropy per target token, exp of it). Eval mode, no_grad, the
    model's train/eval mode restored afterwards."""
    if not examples:
        raise ValueError("no evaluation examples")
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum, targets, correct = 0.0, 0, 0
    try:
        for idx in batches(len(examples), batch_size, None):
            batch = encode_batch(tokenizer, [examples[i] for i in idx], task_type, max_seq_len)
            batch = {k: v.to(dev) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total, count = summed_loss(logits, batch["labels"], task_type)
            loss_sum += float(total)
            targets += count
            if task_type == "seq_cls":
                correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    finally:
        model.train(was_training)
    loss = loss_sum / max(targets, 1)
    if task_type == "seq_cls":
        return {"accuracy": correct / len(examples), "loss": loss}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def apply_global_update(model: Any, dense_updates: Mapping[str, Tensor], extras: Mapping[str, Tensor]) -> None:
    """In place: `W ← W0 + W_t` for every module in `dense_updates` (module path ->
    (d_out, d_in)), and the head (full parameter names) from `extras`."""
    add_to_weights(model, dense_updates)
    set_parameters(model, extras)


def evaluate(
    base: str | Path | tuple[Any, Any],
    task_type: str,
    num_labels: int,
    dense_updates: Mapping[str, Tensor],
    extras: Mapping[str, Tensor],
    examples: Sequence[Example],
    batch_size: int = 32,
    max_seq_len: int = 128,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Metrics of the global model `W0 + W_t` with head `extras` on `examples`.

    `base` is a model path (loaded fresh, see `fedhl.modeling.load_base`) or a
    (model, tokenizer) pair holding W0; a pair's model is deep-copied, never modified."""
    if isinstance(base, tuple):
        model, tokenizer = base
        model = copy.deepcopy(model).to(device)
    else:
        model, tokenizer = load_base(base, task_type, num_labels, device, dtype)
    apply_global_update(model, dense_updates, extras)
    return evaluate_model(model, tokenizer, examples, task_type, batch_size, max_seq_len, device)
