"""Tiny offline models, a tiny WordPiece tokenizer and a separable toy task for the agent tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor

from fedhl.core import LoRAFactors, LoRAScaling
from fedhl.core.types import ClientStart
from fedhl.data import Example
from fedhl.modeling import matches

POSITIVE = ["good", "great", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "very", "really", "acting", "story", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_TARGETS = ["query", "value"]
LLAMA_TARGETS = ["q_proj", "v_proj"]


def write_tokenizer(path: Path) -> None:
    """A lower-casing WordPiece tokenizer over the toy vocabulary, saved to `path`.

    transformers 5: `BertTokenizer(vocab=...)` (the old `vocab_file=` keyword is silently
    ignored and leaves a 5-token vocabulary)."""
    from transformers import BertTokenizer

    vocab = path / "vocab.txt"
    path.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + FILLER) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab=str(vocab))
    assert len(tok) == len(SPECIAL) + len(POSITIVE) + len(NEGATIVE) + len(FILLER)
    tok.save_pretrained(path)


def write_bert(path: Path, num_labels: int = 2) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    write_tokenizer(path)
    cfg = BertConfig(
        vocab_size=len(SPECIAL) + len(POSITIVE) + len(NEGATIVE) + len(FILLER),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)


def write_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    write_tokenizer(path)
    cfg = LlamaConfig(
        vocab_size=len(SPECIAL) + len(POSITIVE) + len(NEGATIVE) + len(FILLER),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def toy_examples(n: int, seed: int) -> list[Example]:
    """Label 1 iff the sentence holds a positive word: separable by one token."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = [*rng.sample(FILLER, 3), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        out.append(Example(" ".join(words), label))
    return out


def targeted(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    return {
        n: (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if n and matches(n, targets) and isinstance(m, torch.nn.Linear)
    }


def random_start(
    model: torch.nn.Module,
    targets: list[str],
    rank: int,
    seed: int,
    *,
    zero_b: bool = False,
    residual: str | None = None,  # None, "dense" or "lowrank"
    head: dict[str, tuple[int, ...]] | None = None,
) -> ClientStart:
    """Start package with random factors (B = 0 for a round-0 start), an optional residual
    per module and random head values."""
    g = torch.Generator().manual_seed(seed)
    factors, res = {}, {}
    for m, (d_out, d_in) in targeted(model, targets).items():
        B = torch.zeros(d_out, rank) if zero_b else 0.3 * torch.randn(d_out, rank, generator=g)  # (d_out, r)
        A = 0.3 * torch.randn(rank, d_in, generator=g)  # (r, d_in)
        factors[m] = LoRAFactors(B, A)
        if residual == "dense":
            res[m] = 0.1 * torch.randn(d_out, d_in, generator=g)  # (d_out, d_in)
        elif residual == "lowrank":
            res[m] = LoRAFactors(0.3 * torch.randn(d_out, 3, generator=g), 0.3 * torch.randn(3, d_in, generator=g))
    extras = {k: 0.5 * torch.randn(*shape, generator=g) for k, shape in (head or {}).items()}
    return ClientStart(factors, res, extras)  # type: ignore[arg-type]


def residual_dense(r: Tensor | LoRAFactors) -> Tensor:
    return r if isinstance(r, Tensor) else r.B @ r.A


def served_updates(start: ClientStart, factors: dict[str, LoRAFactors], scaling: LoRAScaling) -> dict[str, Tensor]:
    """What the server adds to W0 for a client: residual + s(r)·B@A, per module."""
    out = {}
    for m, f in factors.items():
        upd = scaling.scale(f.rank) * (f.B @ f.A)  # (d_out, d_in)
        if m in start.base_residual:
            upd = upd + residual_dense(start.base_residual[m])
        out[m] = upd
    return out


def effective_weight(peft_model: object, module: str) -> Tensor:
    """base_layer.weight + scaling · lora_B @ lora_A of one peft LoRA layer, computed by hand."""
    layer = peft_model.get_base_model().get_submodule(module)  # type: ignore[attr-defined]
    W = layer.base_layer.weight  # (d_out, d_in)
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    return (W + layer.scaling["default"] * (B @ A)).detach()
