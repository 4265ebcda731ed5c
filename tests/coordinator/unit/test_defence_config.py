"""The job's defence block: the strike threshold sits above the clip bound, and a quarantine
has a wall-time limit (issue 12)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedhl.jobspec import DefenceConfig, JobSpec

SPEC = {
    "name": "unit",
    "base_model": "none",
    "target_modules": ["q"],
    "module_shapes": {"layers.0.q": [8, 8]},
    "rank_set": [2],
    "rounds": 2,
    "selection": {"deadline_s": 60},
}


def test_defaults_strike_at_ten_times_the_median_and_limit_quarantine_to_its_rounds_deadlines() -> None:
    spec = JobSpec.model_validate(SPEC)
    d = spec.defence
    assert (d.clip_k, d.reject_k, d.quarantine_rounds, d.quarantine_s) == (3.0, 30.0, 5, None)
    assert d.quarantine_window_s(spec.selection.deadline_s) == 300.0  # 5 rounds × 60 s


def test_an_explicit_quarantine_time_wins() -> None:
    assert DefenceConfig(quarantine_s=30).quarantine_window_s(600) == 30


@pytest.mark.parametrize(
    ("defence", "ok"),
    [
        ({"clip_k": 3, "reject_k": 2}, False),  # a strike below the bound: every clip would count
        ({"clip_k": 3, "reject_k": 3}, True),
        ({"clip_k": None, "reject_k": 2}, True),  # no bound: reject_k unused
        ({"reject_k": None}, True),  # bound actions never count
        ({"quarantine_s": 0}, False),
    ],
)
def test_reject_k_must_not_sit_below_clip_k(defence: dict[str, object], ok: bool) -> None:
    if ok:
        JobSpec.model_validate({**SPEC, "defence": defence})
    else:
        with pytest.raises(ValidationError):
            JobSpec.model_validate({**SPEC, "defence": defence})
