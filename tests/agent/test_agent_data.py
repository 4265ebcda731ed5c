"""Data files, the Dirichlet split and batch encoding."""

from __future__ import annotations

import bz2
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import write_tokenizer

from fedhl.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    dirichlet_split,
    encode_batch,
    load_examples,
    summed_loss,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- happy paths
def test_jsonl_seq_cls(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", '{"text": "good film", "label": 1}\n\n{"text": "bad", "label": 0, "id": 7}\n')
    assert load_examples(p, "seq_cls", num_labels=2) == [Example("good film", 1), Example("bad", 0)]


def test_csv_seq_cls_with_string_labels_and_quoted_newline(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", 'id,text,label\n1,"good, really",1\n2,"two\nlines", 0 \n')
    assert load_examples(p, "seq_cls") == [Example("good, really", 1), Example("two\nlines", 0)]


def test_compressed_tsv(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv.bz2"
    p.write_bytes(bz2.compress(b"text\tlabel\nfine\t2\n"))
    assert load_examples(p, "seq_cls", num_labels=3) == [Example("fine", 2)]


def test_causal_text_and_prompt_response(tmp_path: Path) -> None:
    rows = [{"text": "once upon a time"}, {"prompt": "Q: hi\nA:", "response": " hello"}]
    p = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert load_examples(p, "causal_lm") == [Example("once upon a time"), Example(" hello", prompt="Q: hi\nA:")]
    c = write(tmp_path / "d.csv", "prompt,response\nwhy,because\n")
    assert load_examples(c, "causal_lm") == [Example("because", prompt="why")]


# --------------------------------------------------------------------------- malformed files
BAD_FILES = [
    # (file name, content, task, num_labels, expected message fragments)
    ("a.jsonl", '{"text": "x", "label": 0}\n{"txt": "y", "label": 1}\n', "seq_cls", None, ["line 2", "'text'"]),
    ("a.jsonl", '{"text": "x", "label": "pos"}\n', "seq_cls", None, ["line 1", "integer", "'pos'"]),
    ("a.jsonl", '{"text": "x", "label": 1.5}\n', "seq_cls", None, ["line 1", "integer"]),
    ("a.jsonl", '{"text": "x", "label": true}\n', "seq_cls", None, ["line 1", "integer"]),
    ("a.csv", "text,label\nx,0\ny,2\n", "seq_cls", 2, ["row 2 (line 3)", "label 2", "[0, 2)"]),
    ("a.csv", "text,label\nx,-1\n", "seq_cls", None, ["row 1", "label -1"]),
    ("a.csv", "text\nx\n", "seq_cls", None, ["row 1", "'label'"]),
    ("a.csv", "text,label\n", "seq_cls", None, ["no examples"]),
    ("a.jsonl", "", "seq_cls", None, ["no examples"]),
    ("a.jsonl", "\n  \n", "causal_lm", None, ["no examples"]),
    ("a.txt", "hello\n", "causal_lm", None, ["unknown file extension", "'.txt'"]),
    ("a.jsonl", '{"text": "x"}\n{"text": oops}\n', "causal_lm", None, ["line 2", "bad JSON"]),
    ("a.jsonl", '["x"]\n', "causal_lm", None, ["line 1", "JSON object"]),
    ("a.jsonl", '{"prompt": "x"}\n', "causal_lm", None, ["line 1", "'response'"]),
    ("a.jsonl", '{"body": "x"}\n', "causal_lm", None, ["line 1", "'text'"]),
    ("a.jsonl", '{"text": "   ", "label": 0}\n', "seq_cls", None, ["line 1", "'text' is empty"]),
    ("a.jsonl", '{"text": 5, "label": 0}\n', "seq_cls", None, ["line 1", "must be a string"]),
    ("a.csv", "text,label\nx,1,extra\n", "seq_cls", None, ["row 1", "more fields"]),
    ("a.jsonl", '{"text": "t", "prompt": "p", "response": "r"}\n', "causal_lm", None, ["one or the other"]),
]


@pytest.mark.parametrize(("name", "content", "task", "num_labels", "fragments"), BAD_FILES)
def test_malformed_files_raise_precise_errors(
    tmp_path: Path, name: str, content: str, task: str, num_labels: int | None, fragments: list[str]
) -> None:
    p = write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        load_examples(p, task, num_labels)
    msg = str(err.value)
    assert str(p) in msg
    for frag in fragments:
        assert frag in msg


def test_missing_file_and_bad_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "none.jsonl", "seq_cls")
    with pytest.raises(DataError, match="unknown task_type"):
        load_examples(tmp_path / "none.jsonl", "regression")


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(p, "seq_cls")


# --------------------------------------------------------------------------- Dirichlet split
def label_skew(labels: list[int], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    classes = sorted(set(labels))
    glob = Counter(labels)
    tv = []
    for part in parts:
        c = Counter(labels[i] for i in part)
        tv.append(0.5 * sum(abs(c[k] / len(part) - glob[k] / len(labels)) for k in classes))
    return sum(tv) / len(tv)


LABELS = [i % 4 for i in range(400)]


@pytest.mark.parametrize("alpha", [0.01, 0.3, 100.0])
def test_dirichlet_split_is_a_partition_with_nonempty_clients(alpha: float) -> None:
    parts = dirichlet_split(LABELS, 10, alpha, seed=3, min_per_client=5)
    assert len(parts) == 10
    assert sorted(i for p in parts for i in p) == list(range(len(LABELS)))
    assert all(len(p) >= 5 and p == sorted(p) for p in parts)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skews = [
        sum(label_skew(LABELS, dirichlet_split(LABELS, 8, a, seed=s)) for s in range(5)) / 5 for a in (100.0, 1.0, 0.05)
    ]
    assert skews[0] < 0.1 < skews[1] < skews[2]
    assert skews[2] > 0.5


def test_dirichlet_split_deterministic() -> None:
    a = dirichlet_split(LABELS, 6, 0.5, seed=11)
    assert a == dirichlet_split(LABELS, 6, 0.5, seed=11)
    assert a != dirichlet_split(LABELS, 6, 0.5, seed=12)


def test_dirichlet_split_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split([0, 1, 0], 2, 1.0, 0, min_per_client=2)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(LABELS, 2, 0.0, 0)
    with pytest.raises(ValueError, match="n_clients"):
        dirichlet_split(LABELS, 0, 1.0, 0)


# --------------------------------------------------------------------------- batches and loss
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def test_encode_seq_cls_truncates_and_pads(tokenizer: object) -> None:
    b = encode_batch(tokenizer, [Example("the movie was good", 1), Example("bad " * 20, 0)], "seq_cls", 8)
    assert b["input_ids"].shape == (2, 8)
    assert b["attention_mask"][0].tolist() == [1] * 6 + [0] * 2  # [CLS] 4 words [SEP], padding
    assert b["labels"].tolist() == [1, 0]


def test_encode_causal_masks_prompt_and_padding(tokenizer: object) -> None:
    ex = [Example("good film", prompt="the plot "), Example("a movie")]
    b = encode_batch(tokenizer, ex, "causal_lm", 16)
    ids, labels = b["input_ids"], b["labels"]
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    # row 0: [CLS] the plot good film [SEP]: the response tokens and the [SEP] after them are targets
    assert labels[0].tolist() == [
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        vocab["good"],
        vocab["film"],
        vocab["[SEP]"],
    ]
    # row 1: [CLS] a movie [SEP] + 2 padding; all real tokens are targets
    assert labels[1].tolist() == ids[1, :4].tolist() + [IGNORE_INDEX] * 2
    # truncated inside the prompt: nothing left to learn from
    b = encode_batch(tokenizer, [Example("good", prompt="the plot was very ")], "causal_lm", 4)
    assert b["labels"].tolist() == [[IGNORE_INDEX] * 4]


def test_summed_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    total, count = summed_loss(logits, torch.tensor([0, 1]), "seq_cls")
    expected = torch.log(torch.tensor(2.0)) + (2.0 + torch.log1p(torch.exp(torch.tensor(-2.0))))
    assert count == 2 and float(total) == pytest.approx(float(expected), rel=1e-6)
    # causal: position t predicts label t+1; the ignored target is skipped
    lg = torch.zeros(1, 3, 4)  # uniform over 4 tokens: each target costs log 4
    total, count = summed_loss(lg, torch.tensor([[1, 2, IGNORE_INDEX]]), "causal_lm")
    assert count == 1 and float(total) == pytest.approx(float(torch.log(torch.tensor(4.0))), rel=1e-6)
