"""The vendored review-snippet corpus (see data/ATTRIBUTION.md) as labelled examples."""

from __future__ import annotations

import bz2
import csv
import random
from pathlib import Path

from ..data import Example

CORPUS = Path(__file__).with_name("data") / "rotten_tomatoes_corpus.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}


def load_reviews() -> list[Example]:
    """4,866 snippets: fresh = 1, rotten = 0 (plot summaries dropped)."""
    with bz2.open(CORPUS, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [Example(text=r["text"].strip(), label=LABELS[r["category"]]) for r in rows if r["category"] in LABELS]


def train_test_split(examples: list[Example], test_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    test = [examples[i] for i in order[:test_size]]
    train = [examples[i] for i in order[test_size:]]
    return train, test
