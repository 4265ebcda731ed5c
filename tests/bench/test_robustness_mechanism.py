"""bench/robustness_mechanism.py on a tiny regression: the hostile client's rewrites reach the
production strategies as a job builds them, and the summary keeps robustness.py's shape."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "robustness_mechanism.py"
    spec = importlib.util.spec_from_file_location("bench_robustness_mechanism", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_robustness_mechanism"] = mod
    spec.loader.exec_module(mod)
    return mod


rm = _load()


def tiny() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    rm.problem_arguments(ap)
    args = ap.parse_args(["--shapes", "16x16:4", "--ranks", "2,2,4,4,8", "--rounds", "3", "--local-steps", "3"])
    args.hostile = "c0"
    args.max_weight_ratio = None
    args.size_k = None  # the job's default
    args.min_cosine = None  # the job's default
    args.module_names = ["m0_16x16"]
    return args


def test_defences_bound_the_hostile_client_and_off_shows_the_damage(tmp_path: Path) -> None:
    args = tiny()
    runs = {
        (attack, d): rm.run_one(args, "fedhl", attack, d == "on", 0)
        for attack in ("clean", "scale_x1000", "size_above_bound", "size_at_bound")
        for d in ("on", "off")
    }
    # ×1000: clipped by name every round with the defence on, at a tiny effective weight
    on = runs[("scale_x1000", "on")]
    assert (on["rounds_failed"], on["rounds_naming_hostile"]) == (0, 3)
    assert on["hostile_effective_weight_max"] < 1e-2
    assert runs[("scale_x1000", "off")]["rounds_naming_hostile"] == 0
    # a size above the bound: refused (c0 not in the merge) with the defence on; all the weight off
    assert all("c0" not in r["weights"] for r in runs[("size_above_bound", "on")]["history"][1:])
    assert runs[("size_above_bound", "off")]["hostile_effective_weight_max"] > 0.99
    # a size at the bound: accepted, counted as the round's median size, named every round
    at = runs[("size_at_bound", "on")]
    assert at["rounds_naming_hostile"] == 3
    for row in at["history"][1:]:
        (named,) = [r for r in row["sizes_bounded"] if r["client"] == "c0"]
        assert named["reported"] == 10**6 and named["bounded"] == named["bound"] < 1000
    assert at["hostile_effective_weight_max"] < 0.5 < runs[("size_at_bound", "off")]["hostile_effective_weight_max"]
    # the off-setting ×1000 run is far worse than clean; the defended one is not
    clean_on, clean_off = runs[("clean", "on")]["last5_loss"], runs[("clean", "off")]["last5_loss"]
    assert runs[("scale_x1000", "off")]["last5_loss"] > 10 * clean_off
    assert runs[("scale_x1000", "on")]["last5_loss"] < 2 * clean_on
    # Summary: robustness.py's keys, with the loss mapping
    for (attack, d), res in runs.items():
        path = tmp_path / "fedhl" / d / attack / "seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
    summary = rm.summarise(tmp_path)
    keys = {"attack", "strategy", "defence", "last5_loss", "clean_last5_loss", "drop_pt", "rounds_failed"}
    assert len(summary["attacks"]) == 6 and all(keys <= set(a) for a in summary["attacks"])
    on_drops = [a["drop_pt"] for a in summary["attacks"] if a["defence"] == "on"]
    assert summary["worst_drop_pt_with_defence"] == max(on_drops)
    assert "| fedhl | scale_x1000 | off |" in rm.table(summary)
