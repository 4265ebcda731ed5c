"""Client selection (pure): how many of the available agents a round takes, and which."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from ..jobspec import SelectionConfig


def target_count(cfg: SelectionConfig, available: int) -> int:
    """Agents whose uploads close the round early (before over-selection)."""
    if cfg.count is not None:
        return cfg.count
    if cfg.fraction is not None:
        return max(cfg.min_clients, math.ceil(cfg.fraction * available))
    return max(cfg.min_clients, available)


def select(cfg: SelectionConfig, available: Sequence[str], seed: str) -> tuple[list[str], int] | None:
    """(selected agent ids, target) or None while fewer than `min_clients` are available.

    Over-selection issues `ceil(target × over_selection)` assignments so stragglers do not
    hold the round; it closes once `target` uploads are in.
    """
    if len(available) < cfg.min_clients:
        return None
    target = min(target_count(cfg, len(available)), len(available))
    if target < cfg.min_clients:
        return None
    n = min(len(available), math.ceil(target * cfg.over_selection))
    chosen = random.Random(seed).sample(sorted(available), n)
    return sorted(chosen), target


def quorum(cfg: SelectionConfig, target: int) -> int:
    return max(cfg.min_clients, math.ceil(cfg.quorum * target))
