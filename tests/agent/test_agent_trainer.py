"""prepare() / train() on tiny models: the client's model is exactly what the server thinks it is."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tiny_models import (
    BERT_TARGETS,
    LLAMA_TARGETS,
    effective_weight,
    random_start,
    residual_dense,
    served_updates,
    targeted,
    toy_examples,
)

from fedhl.agent.trainer import (
    BaseModelMismatch,
    Cancelled,
    compute_loss,
    load_base,
    lora_layers,
    measure_throughput,
    prepare,
    read_factors,
    train,
    verify_base,
)
from fedhl.core import LoRAFactors, LoRAScaling, hetlora_tail_penalty
from fedhl.core.types import ClientStart
from fedhl.data import Example, encode_batch
from fedhl.evaluation import apply_global_update, evaluate_model
from fedhl.jobspec import TrainConfig
from fedhl.modeling import directory_sha256

HEAD = {"classifier.weight": (2, 16), "classifier.bias": (2,)}


def cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"local_steps": 4, "lr": 1e-2, "batch_size": 8, "max_seq_len": 16}
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def bert(bert_dir: Path) -> tuple[Any, Any]:
    return load_base(bert_dir, "seq_cls", 2)


# --------------------------------------------------------------------------- loading
def test_load_base_is_deterministic_and_sets_pad(bert_dir: Path, llama_dir: Path) -> None:
    (m1, tok), (m2, _) = load_base(bert_dir, "seq_cls", 2), load_base(bert_dir, "seq_cls", 2)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    assert tok.pad_token == "[PAD]" and m1.config.pad_token_id == 0
    lm, ltok = load_base(llama_dir, "causal_lm", 2)
    assert type(lm).__name__ == "LlamaForCausalLM" and ltok.pad_token is not None
    with pytest.raises(ValueError, match="num_labels"):
        load_base(bert_dir, "seq_cls", 1)


def test_verify_base(bert_dir: Path) -> None:
    good = directory_sha256(bert_dir)
    assert verify_base(bert_dir, good) == good
    with pytest.raises(BaseModelMismatch, match="expects " + "0" * 64):
        verify_base(bert_dir, "0" * 64)
    with pytest.raises(ValueError, match="not a local directory"):
        verify_base(bert_dir / "missing", good)


# --------------------------------------------------------------------------- prepare
@pytest.mark.parametrize(
    ("rule", "residual", "scale"),
    [
        ("standard", None, 8 / 4),
        ("standard", "dense", 8 / 4),
        ("standard", "lowrank", 8 / 4),
        ("rslora", "dense", 8 / 2),
    ],
)
def test_prepare_gives_w0_plus_residual_plus_scaled_start(rule: str, residual: str | None, scale: float) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg_ = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(cfg_).double()  # float64: exact comparisons
    w0 = {m: model.get_submodule(m).weight.detach().clone() for m in targeted(model, BERT_TARGETS)}
    start = random_start(model, BERT_TARGETS, 4, seed=1, residual=residual, head=HEAD)
    scaling = LoRAScaling(8.0, rule)  # type: ignore[arg-type]
    pm = prepare(model, start, BERT_TARGETS, 4, scaling, list(HEAD))

    assert set(lora_layers(pm)) == set(w0) and len(w0) == 4
    for m, f in start.factors.items():
        expected = w0[m] + scale * (f.B.double() @ f.A.double())  # hand scale: 8/4 or 8/sqrt(4)
        if m in start.base_residual:
            expected = expected + residual_dense(start.base_residual[m]).double()
        torch.testing.assert_close(effective_weight(pm, m), expected, rtol=0, atol=1e-12)
        # the layer computes with that weight
        x = torch.randn(3, 16, dtype=torch.float64)
        layer = pm.get_base_model().get_submodule(m)
        torch.testing.assert_close(layer(x), x @ expected.T + layer.base_layer.bias, rtol=1e-12, atol=1e-12)
    base = pm.get_base_model()
    for k, v in start.extras.items():
        assert torch.equal(base.get_parameter(k), v.double()) and base.get_parameter(k).requires_grad
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{k}" for k in HEAD} | {
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in w0 for ab in "AB"
    }
    # what peft would upload is exactly the start factors, under peft's public key names
    assert {m: (f.B.shape, f.A.shape) for m, f in read_factors(pm).items()} == {
        m: (f.B.shape, f.A.shape) for m, f in start.factors.items()
    }


def test_prepare_per_module_ranks(bert: tuple[Any, Any]) -> None:
    model, _ = bert
    mods = list(targeted(model, BERT_TARGETS))
    ranks = {m: (2 if i % 2 else 4) for i, m in enumerate(mods)}
    g = torch.Generator().manual_seed(0)
    start = ClientStart(
        {m: LoRAFactors(torch.randn(16, r, generator=g), torch.randn(r, 16, generator=g)) for m, r in ranks.items()}
    )
    pm = prepare(model, start, BERT_TARGETS, ranks, LoRAScaling(8.0), [])
    for m, pair in lora_layers(pm).items():
        assert pair.A.shape[0] == ranks[m] and pair.scale == 8.0 / ranks[m]


def test_prepare_rejects_inconsistent_starts(bert_dir: Path) -> None:
    def fresh() -> Any:
        return load_base(bert_dir, "seq_cls", 2)[0]

    model = fresh()
    start = random_start(model, BERT_TARGETS, 4, seed=0)
    with pytest.raises(ValueError, match="do not match target_modules"):
        prepare(fresh(), start, ["query"], 4, LoRAScaling(8.0), [])
    with pytest.raises(ValueError, match="assignment says 2"):
        prepare(fresh(), start, BERT_TARGETS, 2, LoRAScaling(8.0), [])
    bad = ClientStart(
        {
            **start.factors,
            "bert.encoder.layer.0.attention.self.query": LoRAFactors(torch.zeros(8, 4), torch.zeros(4, 16)),
        }
    )
    with pytest.raises(ValueError, match=r"\(8, 16\) update, the layer is \(16, 16\)"):
        prepare(fresh(), bad, BERT_TARGETS, 4, LoRAScaling(8.0), [])
    with_extra = ClientStart(start.factors, {}, {"classifier.weight": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="not head parameters"):
        prepare(fresh(), with_extra, BERT_TARGETS, 4, LoRAScaling(8.0), [])
    with pytest.raises(ValueError, match="not a parameter"):
        prepare(fresh(), start, BERT_TARGETS, 4, LoRAScaling(8.0), ["classifier.kernel"])
    used = fresh()
    prepare(used, start, BERT_TARGETS, 4, LoRAScaling(8.0), [])
    with pytest.raises(ValueError, match="fresh copy of the base"):
        prepare(used, start, BERT_TARGETS, 4, LoRAScaling(8.0), [])
    nan = ClientStart({m: LoRAFactors(f.B * float("nan"), f.A) for m, f in start.factors.items()})
    with pytest.raises(ValueError, match="NaN or Inf"):
        prepare(fresh(), nan, BERT_TARGETS, 4, LoRAScaling(8.0), [])
    m0 = next(iter(start.factors))
    with pytest.raises(ValueError, match="belongs to a LoRA target"):
        prepare(fresh(), start, BERT_TARGETS, 4, LoRAScaling(8.0), [f"{m0}.bias"])


# --------------------------------------------------------------------------- train
def test_train_learns_toy_task_and_uploads_rank_shaped_factors(bert: tuple[Any, Any]) -> None:
    model, tok = bert
    data = toy_examples(64, seed=0)
    # a fresh LoRA (B = 0) on a random head. (Random tiny BERTs learn slowly: even full
    # fine-tuning of this one stays at chance for 40 steps at lr 1e-2.)
    start = random_start(model, BERT_TARGETS, 4, seed=2, zero_b=True, head=HEAD)
    pm = prepare(model, start, BERT_TARGETS, 4, LoRAScaling(8.0), list(HEAD))
    before = evaluate_model(pm, tok, data, "seq_cls", max_seq_len=16)
    seen: list[tuple[int, int, float]] = []
    config = cfg(local_steps=60, lr=5e-2, head_lr=1e-1)
    res = train(pm, tok, data, config, "seq_cls", seed=0, progress=lambda *a: seen.append(a))
    after = evaluate_model(pm, tok, data, "seq_cls", max_seq_len=16)

    assert before["accuracy"] <= 0.6 and after["loss"] < 0.5 * before["loss"] and after["accuracy"] >= 0.9
    assert res.metrics["steps"] == 60 and res.metrics["loss_last"] < res.metrics["loss_first"]
    assert {"loss_mean", "seconds", "steps_per_second"} <= set(res.metrics)
    assert [s[:2] for s in seen] == [(i, 60) for i in range(1, 61)]
    assert res.n_examples == 64 and set(res.extras) == set(HEAD)
    for _m, f in res.factors.items():
        assert f.B.shape == (16, 4) and f.A.shape == (4, 16) and f.B.dtype == torch.float32
        assert float(f.B.abs().max()) > 0  # B moved off its zero start
    assert set(res.factors) == set(start.factors)


def test_uploaded_factors_merged_give_the_clients_logits(bert: tuple[Any, Any]) -> None:
    """The key consistency test: W0 + residual + s·B'A' and the uploaded head, applied to a
    plain copy of the base (the server's view), is the trained peft model (the client's)."""
    model, tok = bert
    server_base = copy.deepcopy(model)
    start = random_start(model, BERT_TARGETS, 4, seed=5, residual="dense", head=HEAD)
    lowrank = random_start(model, BERT_TARGETS, 4, seed=6, residual="lowrank")
    first = next(iter(start.factors))
    start.base_residual[first] = lowrank.base_residual[first]  # mix dense and low-rank residuals
    scaling = LoRAScaling(8.0, "rslora")
    pm = prepare(model, start, BERT_TARGETS, 4, scaling, list(HEAD))
    res = train(pm, tok, toy_examples(32, seed=1), cfg(local_steps=6, head_lr=5e-2), "seq_cls", seed=3)

    server = copy.deepcopy(server_base)
    apply_global_update(server, served_updates(start, res.factors, scaling), res.extras)
    batch = encode_batch(tok, toy_examples(16, seed=9), "seq_cls", 16)
    with torch.no_grad():
        client_logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        server.eval()
        server_logits = server(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(server_logits, client_logits, rtol=1e-5, atol=1e-5)
    # and the factors really changed: the start point's logits are different
    start_model = copy.deepcopy(server_base)
    apply_global_update(start_model, served_updates(start, start.factors, scaling), start.extras)
    with torch.no_grad():
        start_logits = start_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float((start_logits - client_logits).abs().max()) > 1e-3


def test_train_is_deterministic_for_a_seed(bert_dir: Path) -> None:
    def run(seed: int) -> Any:
        model, tok = load_base(bert_dir, "seq_cls", 2)  # dropout is on: the seed must fix it
        pm = prepare(
            model,
            random_start(model, BERT_TARGETS, 2, seed=0, head=HEAD),
            BERT_TARGETS,
            2,
            LoRAScaling(4.0),
            list(HEAD),
        )
        return train(pm, tok, toy_examples(24, seed=0), cfg(local_steps=3), "seq_cls", seed=seed)

    a, b, c = run(7), run(7), run(8)
    for m in a.factors:
        assert torch.equal(a.factors[m].B, b.factors[m].B) and torch.equal(a.factors[m].A, b.factors[m].A)
    assert a.metrics["loss_mean"] == b.metrics["loss_mean"]
    assert any(not torch.equal(a.factors[m].B, c.factors[m].B) for m in a.factors)


def test_local_epochs_and_stop(bert: tuple[Any, Any]) -> None:
    model, tok = bert
    pm = prepare(model, random_start(model, BERT_TARGETS, 2, seed=0), BERT_TARGETS, 2, LoRAScaling(4.0), [])
    res = train(pm, tok, toy_examples(20, seed=0), cfg(local_epochs=1.5, batch_size=8), "seq_cls")
    assert res.metrics["steps"] == 5  # ceil(1.5 × ceil(20 / 8)) = ceil(4.5)
    assert res.extras == {}
    stop = threading.Event()

    def progress(step: int, total: int, loss: float) -> None:
        if step == 2:
            stop.set()

    with pytest.raises(Cancelled, match="after 2 of 10"):
        train(pm, tok, toy_examples(20, seed=0), cfg(local_steps=10), "seq_cls", progress=progress, stop=stop)


def test_hetlora_penalty_changes_only_the_tail_gradient(bert: tuple[Any, Any]) -> None:
    model, tok = bert
    pm = prepare(
        model, random_start(model, BERT_TARGETS, 4, seed=3, head=HEAD), BERT_TARGETS, 4, LoRAScaling(8.0), list(HEAD)
    )
    pm.eval()  # no dropout: the two passes see the same network
    batch = encode_batch(tok, toy_examples(8, seed=0), "seq_cls", 16)

    def grads(hetlora: tuple[float, float] | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
        pm.zero_grad(set_to_none=True)
        loss, task, _penalty = compute_loss(pm, batch, "seq_cls", hetlora)
        loss.backward()
        out = {m: (p.B.grad.clone(), p.A.grad.clone()) for m, p in lora_layers(pm).items()}
        return out, float((loss - task).detach())

    plain, zero = grads(None)
    reg, pen = grads((0.5, 0.3))
    expected = sum(float(hetlora_tail_penalty(p.B.detach(), p.A.detach(), 0.5, 0.3)) for p in lora_layers(pm).values())
    assert zero == 0 and pen == pytest.approx(expected, rel=1e-5) and pen > 0
    for m in plain:
        (gb0, ga0), (gb1, ga1) = plain[m], reg[m]
        k = 2  # ⌊0.5 · 4⌋: columns/rows from k on are the tail
        torch.testing.assert_close(gb1[:, :k], gb0[:, :k], rtol=0, atol=1e-7)
        torch.testing.assert_close(ga1[:k], ga0[:k], rtol=0, atol=1e-7)
        assert float((gb1[:, k:] - gb0[:, k:]).abs().max()) > 1e-4
        assert float((ga1[k:] - ga0[k:]).abs().max()) > 1e-4
    pm.zero_grad(set_to_none=True)
    # train() takes the regulariser from the job's TrainConfig too
    res = train(pm, tok, toy_examples(8, seed=0), cfg(local_steps=1, hetlora_gamma=0.5, hetlora_lambda=0.3), "seq_cls")
    assert res.metrics["hetlora_penalty_last"] == pytest.approx(expected, rel=1e-5)


def test_causal_lm_prompt_response_round_trip(llama_dir: Path) -> None:
    model, tok = load_base(llama_dir, "causal_lm", 2)
    server_base = copy.deepcopy(model)
    data = [
        Example("good film", prompt="the plot "),
        Example("a really nice movie"),
        Example("bad", prompt="acting "),
    ] * 4
    start = random_start(model, LLAMA_TARGETS, 2, seed=4, residual="dense")
    scaling = LoRAScaling(4.0)
    pm = prepare(model, start, LLAMA_TARGETS, 2, scaling, [])
    before = evaluate_model(pm, tok, data, "causal_lm", max_seq_len=16)
    res = train(pm, tok, data, SimpleNamespace(**{**cfg(local_steps=30, lr=3e-2).model_dump()}), "causal_lm")
    after = evaluate_model(pm, tok, data, "causal_lm", max_seq_len=16)
    assert after["loss"] < before["loss"] and after["perplexity"] == pytest.approx(
        torch.exp(torch.tensor(after["loss"])).item()
    )
    assert all(f.rank == 2 for f in res.factors.values()) and len(res.factors) == 4
    server = copy.deepcopy(server_base)
    apply_global_update(server, served_updates(start, res.factors, scaling), res.extras)
    batch = encode_batch(tok, data[:3], "causal_lm", 16)
    with torch.no_grad():
        a = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = server(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_measure_throughput_leaves_no_gradients(bert: tuple[Any, Any]) -> None:
    model, tok = bert
    pm = prepare(model, random_start(model, BERT_TARGETS, 2, seed=0), BERT_TARGETS, 2, LoRAScaling(4.0), [])
    sps = measure_throughput(pm, tok, batch_size=2, seq_len=8, steps=2)
    assert sps > 0
    assert all(p.grad is None for p in pm.parameters()) and not pm.training
