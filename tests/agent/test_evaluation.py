"""Server-side evaluation of W0 + W_t equals the client's own view of its trained model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import BERT_TARGETS, LLAMA_TARGETS, random_start, served_updates, toy_examples

from fedhl.agent.trainer import load_base, prepare, train
from fedhl.core import LoRAScaling
from fedhl.data import Example
from fedhl.evaluation import evaluate, evaluate_model
from fedhl.jobspec import TrainConfig

HEAD = {"classifier.weight": (2, 16), "classifier.bias": (2,)}


def test_evaluate_on_uploaded_update_matches_trained_model(bert_dir: Path) -> None:
    model, tok = load_base(bert_dir, "seq_cls", 2)
    pristine = copy.deepcopy(model)
    start = random_start(model, BERT_TARGETS, 4, seed=1, zero_b=True, head=HEAD)
    scaling = LoRAScaling(8.0)
    pm = prepare(model, start, BERT_TARGETS, 4, scaling, list(HEAD))
    config = TrainConfig(local_steps=20, lr=5e-2, head_lr=1e-1, batch_size=8, max_seq_len=16)
    res = train(pm, tok, toy_examples(48, seed=0), config, "seq_cls", seed=1)
    held_out = toy_examples(40, seed=5)
    client = evaluate_model(pm, tok, held_out, "seq_cls", batch_size=16, max_seq_len=16)
    updates = served_updates(start, res.factors, scaling)  # W_t for a round-0 client: s·B'A'

    from_path = evaluate(bert_dir, "seq_cls", 2, updates, res.extras, held_out, batch_size=16, max_seq_len=16)
    base = load_base(bert_dir, "seq_cls", 2)
    before = copy.deepcopy(base[0].state_dict())
    from_pair = evaluate(base, "seq_cls", 2, updates, res.extras, held_out, batch_size=7, max_seq_len=16)

    for got in (from_path, from_pair):
        assert set(got) == {"accuracy", "loss"}
        assert got["accuracy"] == client["accuracy"]
        assert got["loss"] == pytest.approx(client["loss"], rel=1e-5)
    assert all(torch.equal(v, base[0].state_dict()[k]) for k, v in before.items())  # the pair was not touched
    # and the global model is not the untrained base
    untrained = evaluate_model(pristine, tok, held_out, "seq_cls", max_seq_len=16)
    assert untrained["loss"] != pytest.approx(client["loss"], rel=1e-3)


def test_evaluate_causal_lm_perplexity(llama_dir: Path) -> None:
    data = [Example("good film"), Example("bad", prompt="the plot ")]
    model, tok = load_base(llama_dir, "causal_lm", 2)
    plain = evaluate_model(model, tok, data, "causal_lm", max_seq_len=16)
    zero = {m: torch.zeros(16, 16) for m in random_start(model, LLAMA_TARGETS, 2, seed=0).factors}
    got = evaluate(llama_dir, "causal_lm", 2, zero, {}, data, max_seq_len=16)
    assert set(got) == {"loss", "perplexity"}
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert got["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(got["loss"]))), rel=1e-6)
    assert got["loss"] == pytest.approx(float(torch.log(torch.tensor(25.0))), rel=0.2)  # ~uniform: random model


def test_evaluate_rejects_bad_updates(bert_dir: Path) -> None:
    base = load_base(bert_dir, "seq_cls", 2)
    data = toy_examples(4, seed=0)
    with pytest.raises(ValueError, match=r"has no module 'bert\.nope'"):
        evaluate(base, "seq_cls", 2, {"bert.nope": torch.zeros(16, 16)}, {}, data)
    with pytest.raises(ValueError, match=r"shape \(16, 8\)"):
        evaluate(base, "seq_cls", 2, {"bert.encoder.layer.0.attention.self.query": torch.zeros(16, 8)}, {}, data)
    with pytest.raises(ValueError, match=r"no parameter 'classifier\.kernel'"):
        evaluate(base, "seq_cls", 2, {}, {"classifier.kernel": torch.zeros(2)}, data)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(
            base,
            "seq_cls",
            2,
            {"bert.encoder.layer.0.attention.self.query": torch.full((16, 16), float("nan"))},
            {},
            data,
        )
