"""Local training data: JSONL/CSV files read into `Example`s, a Dirichlet label-skew split for
the demo and simulations, and the tokenised batches both the trainer and the server-side
evaluator feed to a model.

File formats (one example per JSONL line or CSV row; `.gz` / `.bz2` compression allowed):

    seq_cls     text, label          label: an integer in [0, num_labels)
    causal_lm   text                 the whole text is the target
                prompt, response     the model reads prompt + response (+ EOS), joined
                                     as-is (put any separator in the prompt); only the
                                     response's tokens (and what follows) count in the loss

Errors name the file, the line (JSONL) or row (CSV, with its line number) and the problem.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from torch import Tensor

TaskType = Literal["seq_cls", "causal_lm"]
TASK_TYPES: tuple[str, ...] = ("seq_cls", "causal_lm")
IGNORE_INDEX = -100  # label value that the loss skips (padding, prompt tokens)
_INT_RE = re.compile(r"^\s*[+-]?\d+\s*$")


class DataError(ValueError):
    """A data file cannot be used; the message names the file, the line/row and the problem."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    seq_cls: `text` and `label`. causal_lm: `text` alone (all of it is the target), or
    `prompt` + `text` (the response): the model reads `prompt + text`, the loss counts only
    the response's tokens.
    """

    text: str
    label: int | None = None
    prompt: str | None = None


# --------------------------------------------------------------------------- file reading
def _open_text(path: Path) -> IO[str]:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    if suffixes and suffixes[-1] == ".bz2":
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _format(path: Path) -> str:
    """'jsonl' or 'csv' from the file name (a trailing .gz/.bz2 is ignored)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext in (".csv", ".tsv"):
        return "csv"
    raise DataError(f"{path}: unknown file extension {ext or '(none)'!r}; expected .jsonl, .ndjson, .csv or .tsv")


def _jsonl_rows(path: Path, f: IO[str]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _csv_rows(path: Path, f: IO[str]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    reader = csv.DictReader(f, delimiter=delimiter)
    if reader.fieldnames is None:
        return
    header = [h.strip() if h else h for h in reader.fieldnames]
    reader.fieldnames = header
    for row_no, row in enumerate(reader, start=1):
        where = f"{path}, row {row_no} (line {reader.line_num})"
        if None in row:
            raise DataError(f"{where}: more fields than the header's {len(header)} columns")
        yield where, row


def _text(where: str, row: Mapping[str, Any], key: str, columns: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing column {key!r} (a {columns} file needs it)")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return value


def _label(where: str, row: Mapping[str, Any], num_labels: int | None) -> int:
    if "label" not in row or row["label"] is None:
        raise DataError(f"{where}: missing column 'label' (a seq_cls file needs text and label)")
    raw = row["label"]
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise DataError(f"{where}: label must be an integer, got {raw!r}")
    if isinstance(raw, str):
        if not _INT_RE.match(raw):
            raise DataError(f"{where}: label must be an integer, got {raw!r}")
        raw = int(raw)
    if raw < 0 or (num_labels is not None and raw >= num_labels):
        bound = f"[0, {num_labels})" if num_labels is not None else "non-negative"
        raise DataError(f"{where}: label {raw} is outside {bound}")
    return raw


def _example(where: str, row: Mapping[str, Any], task_type: str, num_labels: int | None) -> Example:
    if task_type == "seq_cls":
        return Example(_text(where, row, "text", "seq_cls (text, label)"), _label(where, row, num_labels))

    def filled(key: str) -> bool:
        return row.get(key) not in (None, "")

    if filled("prompt") or filled("response"):
        if not filled("text"):
            prompt = _text(where, row, "prompt", "causal_lm prompt/response")
            return Example(_text(where, row, "response", "causal_lm prompt/response"), prompt=prompt)
        raise DataError(f"{where}: has both 'text' and 'prompt'/'response'; use one or the other")
    if row.get("text") is None:
        raise DataError(f"{where}: missing column 'text' (a causal_lm file needs 'text', or 'prompt' and 'response')")
    return Example(_text(where, row, "text", "causal_lm"))


def load_examples(path: str | Path, task_type: str, num_labels: int | None = None) -> list[Example]:
    """Read a JSONL or CSV file into examples; raise `DataError` on the first bad row."""
    if task_type not in TASK_TYPES:
        raise DataError(f"unknown task_type {task_type!r}; expected one of {list(TASK_TYPES)}")
    if num_labels is not None and num_labels < 1:
        raise DataError(f"num_labels must be positive, got {num_labels}")
    p = Path(path)
    fmt = _format(p)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    examples: list[Example] = []
    try:
        with _open_text(p) as f:
            rows = _jsonl_rows(p, f) if fmt == "jsonl" else _csv_rows(p, f)
            examples.extend(_example(where, row, task_type, num_labels) for where, row in rows)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, csv.Error) as e:
        raise DataError(f"{p}: cannot read: {e}") from None
    if not examples:
        raise DataError(f"{p}: no examples (the file is empty or holds only a header)")
    return examples


# --------------------------------------------------------------------------- Dirichlet split
def dirichlet_split(
    labels: Sequence[int],
    n_clients: int,
    alpha: float,
    seed: int,
    min_per_client: int = 1,
) -> list[list[int]]:
    """Label-skewed partition of `range(len(labels))` into `n_clients` sorted index lists.

    For every class, the clients' shares are drawn from Dirichlet(alpha · 1): small alpha
    gives each client few classes, large alpha approaches an IID split. Every index is used
    exactly once. Clients left with fewer than `min_per_client` examples are topped up,
    deterministically, from the largest clients. Same inputs and seed ⇒ same split.
    """
    if n_clients < 1:
        raise DataError(f"n_clients must be positive, got {n_clients}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise DataError(f"alpha must be a positive finite number, got {alpha}")
    if min_per_client < 1:
        raise DataError(f"min_per_client must be at least 1, got {min_per_client}")
    n = len(labels)
    if n < n_clients * min_per_client:
        raise DataError(f"{n} examples cannot give {n_clients} clients {min_per_client} each")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    clients: list[list[int]] = [[] for _ in range(n_clients)]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            clients[c].extend(int(i) for i in part)
    for c in range(n_clients):  # top up: take from the currently largest client
        while len(clients[c]) < min_per_client:
            donor = max(range(n_clients), key=lambda j: (len(clients[j]), -j))
            clients[c].append(clients[donor].pop())
    return [sorted(c) for c in clients]


# --------------------------------------------------------------------------- batches
def encode_batch(tokenizer: Any, examples: Sequence[Example], task_type: str, max_seq_len: int) -> dict[str, Tensor]:
    """Tokenise, truncate to `max_seq_len` and pad a batch.

    Returns `input_ids` (B, T), `attention_mask` (B, T) and `labels`: (B,) class ids for
    seq_cls; (B, T) token ids for causal_lm with IGNORE_INDEX on padding and prompt tokens
    (the model's logits at t predict labels at t + 1; `summed_loss` shifts).
    """
    if not examples:
        raise DataError("cannot encode an empty batch")
    if task_type == "seq_cls":
        if any(e.label is None for e in examples):
            raise DataError("seq_cls examples need labels")
        enc = tokenizer(
            [e.text for e in examples], truncation=True, max_length=max_seq_len, padding=True, return_tensors="pt"
        )
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)  # (B,)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    if task_type != "causal_lm":
        raise DataError(f"unknown task_type {task_type!r}")
    eos = tokenizer.eos_token or ""
    texts = [e.text if e.prompt is None else e.prompt + e.text + eos for e in examples]
    with_prompt = any(e.prompt is not None for e in examples)
    if with_prompt and not tokenizer.is_fast:
        raise DataError("prompt/response examples need a fast tokenizer (character offsets locate the prompt)")
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_seq_len,
        padding=True,
        return_tensors="pt",
        return_offsets_mapping=with_prompt,
    )
    input_ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)  # (B, T)
    if with_prompt:
        starts, ends = enc["offset_mapping"].unbind(-1)  # (B, T) character span of each token
        for b, e in enumerate(examples):
            if e.prompt is None:
                continue
            # the target starts at the first real token that begins in the response; all before it
            # (leading special tokens, the prompt, a token straddling the boundary) is context
            in_response = (starts[b] >= len(e.prompt)) & (ends[b] > starts[b]) & (mask[b] == 1)  # (T,)
            hits = in_response.nonzero()
            first = int(hits[0, 0]) if len(hits) else labels.shape[1]
            labels[b, :first] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def summed_loss(logits: Tensor, labels: Tensor, task_type: str) -> tuple[Tensor, int]:
    """(sum of per-target cross-entropies, number of targets) for one batch, in float32 or
    wider. seq_cls: logits (B, C), labels (B,), one target per example. causal_lm: logits
    (B, T, V), labels (B, T); position t predicts token t + 1, IGNORE_INDEX is skipped."""
    if task_type == "seq_cls":
        logits_2d, targets = logits, labels  # (B, C), (B,)
    else:
        logits_2d = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B·(T-1), V)
        targets = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    logits_2d = logits_2d.to(torch.promote_types(logits_2d.dtype, torch.float32))
    total = torch.nn.functional.cross_entropy(logits_2d, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[list[int]]:
    """Index batches over one epoch: shuffled with `generator`, in order without one; the
    last batch may be short."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
