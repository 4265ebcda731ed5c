"""State files round-trip exactly and reject what is not a state; the CLI answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedhl.cli import main
from fedhl.codec import StateFileError, load_state, save_state
from fedhl.core import GlobalState, LoRAFactors


def test_dense_state_round_trips_bit_exactly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = GlobalState(
        round=3,
        dense={"a.q": torch.randn(5, 4, generator=g)},
        extras={"head.weight": torch.randn(2, 4, generator=g)},
    )
    save_state(state, tmp_path / "s.safetensors")

    back = load_state(tmp_path / "s.safetensors")

    assert back.round == 3
    assert torch.equal(back.dense["a.q"], state.dense["a.q"])
    assert torch.equal(back.extras["head.weight"], state.extras["head.weight"])


def test_factor_state_round_trips(tmp_path: Path) -> None:
    state = GlobalState(round=1, factors={"m": LoRAFactors(torch.ones(3, 2), torch.zeros(2, 4))})
    save_state(state, tmp_path / "s.safetensors")

    back = load_state(tmp_path / "s.safetensors")

    assert back.factors["m"].rank == 2 and torch.equal(back.factors["m"].B, torch.ones(3, 2))


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({"dense::m": torch.zeros(2, 2)}, {"fedhl": '{"format": "other"}'}, "not a"),
        ({"dense::m": torch.zeros(2, 2)}, {"format": "fedhl-state/1"}, "not a"),
        ({"dense::m": torch.zeros(2, 2)}, {"fedhl": '{"format": "fedhl-state/1"}'}, "round"),
        ({"weird::m": torch.zeros(2, 2)}, {"fedhl": '{"format": "fedhl-state/1", "round": 0}'}, "unexpected"),
        ({"lora_B::m": torch.zeros(2, 2)}, {"fedhl": '{"format": "fedhl-state/1", "round": 0}'}, "unpaired"),
        (
            {"lora_B::m": torch.zeros(2, 2), "lora_A::m": torch.zeros(3, 2)},
            {"fedhl": '{"format": "fedhl-state/1", "round": 0}'},
            "rank mismatch",
        ),
    ],
)
def test_bad_state_files_are_refused(
    tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    with pytest.raises(StateFileError, match=message):
        load_state(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_state(GlobalState(round=0, dense={"m": torch.randn(8, 8)}), path)
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(StateFileError, match="not a readable"):
        load_state(path)


def test_cli_info_lists_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"fedhl", "flexlora", "hetlora", "zeropad", "fedit", "flora"} <= set(info["strategies"])


def test_cli_reports_bad_state_file_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").write_bytes(b"not a file")
    code = main(
        [
            "export",
            "--state",
            str(tmp_path / "x"),
            "--rank",
            "2",
            "--alpha",
            "4",
            "--base-model",
            "m",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "not a readable" in capsys.readouterr().err
