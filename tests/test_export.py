"""Adapter and merged export (fedhl.export) against real peft / transformers loading.

A tiny random-config BERT (float64, saved to a temp dir) is the base model; nothing is
downloaded. Prepare / Execute / Assert.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import Tensor
from transformers import BertConfig, BertForSequenceClassification

from fedhl.core import LoRAScaling
from fedhl.export import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    adapter_factors,
    export_peft_adapter,
    merge_into_base,
    save_merged,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")

R = 4
MODULES = {  # module path -> (d_out, d_in)
    "bert.encoder.layer.0.attention.self.query": (32, 32),
    "bert.encoder.layer.1.intermediate.dense": (64, 32),
    "bert.encoder.layer.1.output.dense": (32, 64),
}
INPUT_IDS = torch.tensor([[2, 17, 5, 88, 41, 3], [2, 9, 64, 12, 99, 3]])


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3
    )
    path = tmp_path_factory.mktemp("base")
    BertForSequenceClassification(cfg).double().save_pretrained(path)
    return path


def load_base(path: Path) -> BertForSequenceClassification:
    model = BertForSequenceClassification.from_pretrained(path)
    model.eval()
    assert next(model.parameters()).dtype == torch.float64
    return model


def low_rank(shape: tuple[int, int], rank: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(shape[0], rank, generator=g, dtype=torch.float64)  # (d_out, rank)
    Rm = torch.randn(rank, shape[1], generator=g, dtype=torch.float64)  # (rank, d_in)
    return 0.05 * L @ Rm


def trunc(W: Tensor, r: int) -> Tensor:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    out: Tensor = (U[:, :r] * S[:r]) @ Vh[:r]  # (d_out, d_in)
    return out


def updates_of_rank(rank: int) -> dict[str, Tensor]:
    return {m: low_rank(shape, rank, seed=i) for i, (m, shape) in enumerate(MODULES.items())}


def read_adapter(out: Path) -> tuple[dict[str, object], dict[str, tuple[int, ...]]]:
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    with safe_open(str(out / ADAPTER_WEIGHTS_NAME), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118
    return config, shapes


# --------------------------------------------------------------------------- factors
def test_adapter_factors_truncate_and_report_dropped_fraction() -> None:
    # Prepare
    W = low_rank((24, 16), 9, seed=7)
    scaling = LoRAScaling(alpha=8.0)
    # Execute
    f, frac = adapter_factors(W, R, scaling)
    _, frac_zero = adapter_factors(torch.zeros(5, 3, dtype=torch.float64), R, scaling)
    f_pad, frac_pad = adapter_factors(low_rank((5, 3), 2, seed=1), 6, scaling)
    # Assert
    S = torch.linalg.svdvals(W)
    assert f.B.shape == (24, R) and f.A.shape == (R, 16) and f.A.dtype == torch.float64
    torch.testing.assert_close(scaling.scale(R) * f.B @ f.A, trunc(W, R), rtol=0, atol=1e-12)
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-12)
    assert frac == pytest.approx(float((S[R:] ** 2).sum() / (S**2).sum()), rel=1e-10)
    assert frac_zero == 0.0
    assert f_pad.rank == 6 and frac_pad == pytest.approx(0.0, abs=1e-24)


# --------------------------------------------------------------------------- 1 + 3: round trip
@pytest.mark.parametrize("rule", ["standard", "rslora"])
@pytest.mark.parametrize("true_rank", [R + 3, R - 1], ids=["lossy", "exact"])
def test_adapter_round_trips_through_peft(base_dir: Path, tmp_path: Path, rule: str, true_rank: int) -> None:
    # Prepare
    scaling = LoRAScaling(alpha=16.0, rule=rule)  # type: ignore[arg-type]
    updates = updates_of_rank(true_rank)
    base = load_base(base_dir)
    W0 = {m: base.state_dict()[f"{m}.weight"].clone() for m in MODULES}
    # Execute
    report = export_peft_adapter(
        updates,
        tmp_path,
        rank=R,
        scaling=scaling,
        base_model_name_or_path=str(base_dir),
        task_type="SEQ_CLS",
        dtype=torch.float64,
        base_state=base.state_dict(),
    )
    peft_model = PeftModel.from_pretrained(base, tmp_path)
    peft_scaling = {m: peft_model.get_submodule(f"base_model.model.{m}").scaling["default"] for m in MODULES}
    merged = peft_model.merge_and_unload().state_dict()
    # Assert
    config, keys = read_adapter(tmp_path)
    assert report.extras_from_base == ["classifier.bias", "classifier.weight"]  # SEQ_CLS head
    assert "base_model.model.classifier.weight" in keys
    assert config["use_rslora"] is (rule == "rslora") and config["r"] == R
    expected_s = 16.0 / (math.sqrt(R) if rule == "rslora" else R)
    assert report.scale == pytest.approx(expected_s)
    assert all(s == pytest.approx(expected_s) for s in peft_scaling.values())
    total_dropped = 0.0
    for m, W in updates.items():
        got = merged[f"{m}.weight"]
        torch.testing.assert_close(got, W0[m] + trunc(W, R), rtol=0, atol=1e-10)
        err = float(torch.linalg.matrix_norm(got - (W0[m] + W)))
        assert err == pytest.approx(report.modules[m].error_fro, rel=1e-6, abs=1e-10)
        total_dropped += err**2
    if true_rank <= R:
        assert report.dropped_fraction == pytest.approx(0.0, abs=1e-20)
    else:
        assert report.dropped_fraction > 1e-3
        assert report.dropped_energy == pytest.approx(total_dropped, rel=1e-6)


def test_adapter_files_match_peft_save_pretrained(base_dir: Path, tmp_path: Path) -> None:
    # Prepare
    scaling = LoRAScaling(alpha=8.0)
    head = {
        "classifier.weight": torch.zeros(3, 32, dtype=torch.float64),
        "classifier.bias": torch.zeros(3, dtype=torch.float64),
    }
    reference = get_peft_model(
        load_base(base_dir),
        LoraConfig(
            r=R, lora_alpha=8, target_modules=list(MODULES), task_type="SEQ_CLS", modules_to_save=["classifier"]
        ),
    )
    # Execute
    export_peft_adapter(
        updates_of_rank(2),
        tmp_path / "ours",
        rank=R,
        scaling=scaling,
        base_model_name_or_path=None,
        task_type="SEQ_CLS",
        extras=head,
    )
    reference.save_pretrained(tmp_path / "peft")
    # Assert
    ours_cfg, ours = read_adapter(tmp_path / "ours")
    ref_cfg, ref = read_adapter(tmp_path / "peft")
    assert ours == ref  # same key names and shapes
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in ours
    assert "base_model.model.classifier.weight" in ours
    assert set(ours_cfg) == set(ref_cfg)
    for key in ("r", "lora_alpha", "use_rslora", "task_type", "peft_type", "bias"):
        assert ours_cfg[key] == ref_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(ref_cfg["target_modules"])  # type: ignore[call-overload]
    assert ours_cfg["modules_to_save"] == ["classifier", "score"]  # peft's SEQ_CLS defaults


# --------------------------------------------------------------------------- 2: classifier head
@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])
def test_classifier_head_restored_via_modules_to_save(base_dir: Path, tmp_path: Path, task_type: str | None) -> None:
    # Prepare
    scaling = LoRAScaling(alpha=8.0)
    updates = updates_of_rank(R)  # R >= rank(W_T): the export is exact
    g = torch.Generator().manual_seed(3)
    head = {
        "classifier.weight": torch.randn(3, 32, generator=g, dtype=torch.float64),
        "classifier.bias": torch.randn(3, generator=g, dtype=torch.float64),
    }
    manual = load_base(base_dir)
    manual.load_state_dict({**merge_into_base(manual.state_dict(), updates), **head})
    untouched = load_base(base_dir)
    # Execute
    report = export_peft_adapter(
        updates,
        tmp_path,
        rank=R,
        scaling=scaling,
        base_model_name_or_path=str(base_dir),
        task_type=task_type,
        extras=head,
        dtype=torch.float64,
    )
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path)
    loaded.eval()
    with torch.no_grad():
        expected = manual(input_ids=INPUT_IDS).logits
        got = loaded(input_ids=INPUT_IDS).logits
        before = untouched(input_ids=INPUT_IDS).logits
    # Assert
    assert report.modules_to_save == (["classifier", "score"] if task_type else ["classifier"])
    assert report.extras == ["classifier.bias", "classifier.weight"]
    assert report.extras_from_base == []
    assert not torch.allclose(before, expected, atol=1e-3)  # the head and update matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- 4: merged export
def test_merge_into_base_and_save_merged_are_exact(base_dir: Path, tmp_path: Path) -> None:
    # Prepare
    model = load_base(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updates = updates_of_rank(7)
    # Execute
    merged = merge_into_base(before, updates)
    save_merged(model, updates, tmp_path)
    reloaded = load_base(tmp_path).state_dict()
    # Assert
    assert set(reloaded) == set(before)
    for key, W0 in before.items():
        module = key.removesuffix(".weight")
        expected = W0 + updates[module] if module in updates else W0
        assert torch.equal(merged[key], expected), key
        assert torch.equal(reloaded[key], expected), key
        assert torch.equal(model.state_dict()[key], W0), key  # the model is not modified
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))


# --------------------------------------------------------------------------- 5: bad input
def test_bad_input_raises_precise_errors(base_dir: Path, tmp_path: Path) -> None:
    # Prepare
    base_state = load_base(base_dir).state_dict()
    q = "bert.encoder.layer.0.attention.self.query"
    good = {q: low_rank((32, 32), 2, seed=0)}
    nan = {q: torch.full((32, 32), float("nan"), dtype=torch.float64)}
    scaling = LoRAScaling(alpha=8.0)
    out = tmp_path / "never"

    def export(updates: dict[str, Tensor], **kw: object) -> None:
        args: dict[str, object] = {"rank": R, "scaling": scaling, "base_model_name_or_path": None, "task_type": None}
        args.update(kw)
        export_peft_adapter(updates, out, **args)  # type: ignore[arg-type]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
        export(good, rank=0)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
        adapter_factors(good[q], 0, scaling)
    with pytest.raises(ValueError, match=rf"module '{q}' has non-finite values"):
        export(nan)
    with pytest.raises(ValueError, match=r"non-finite"):
        merge_into_base(base_state, nan)
    with pytest.raises(ValueError, match=r"unknown module 'bert.nope': the base model has no"):
        export({"bert.nope": good[q]}, base_state=base_state)
    with pytest.raises(ValueError, match=r"unknown module 'bert.nope'"):
        merge_into_base(base_state, {"bert.nope": good[q]})
    with pytest.raises(ValueError, match=r"shape mismatch for module .* got \(32, 16\)"):
        merge_into_base(base_state, {q: torch.zeros(32, 16, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"shape mismatch for extra 'classifier.weight'"):
        export(good, extras={"classifier.weight": torch.zeros(2, 32)}, base_state=base_state)
    with pytest.raises(ValueError, match=r"not parameter names: got '.*query.weight'"):
        export({f"{q}.weight": good[q]})
    with pytest.raises(ValueError, match=r"must be a 2-D"):
        export({q: torch.zeros(32)})
    with pytest.raises(ValueError, match=r"not under any module in modules_to_save"):
        export(good, extras={"classifier.bias": torch.zeros(3)}, modules_to_save=["pooler"])
    with pytest.raises(ValueError, match=r"unknown peft task_type 'SEQ_CLASSIFICATION'"):
        export(good, task_type="SEQ_CLASSIFICATION")
    with pytest.raises(ValueError, match=r"task_type 'SEQ_CLS' makes peft load the modules"):
        export(good, task_type="SEQ_CLS")  # no head in extras and no base_state to copy it
    with pytest.raises(ValueError, match=r"fall under modules_to_save"):
        export({"classifier": torch.zeros(3, 32)}, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"no module updates"):
        export({})
    assert not out.exists()  # validation runs before anything is written
