"""The device/dtype path: a float32 FedHL round computed on CUDA (or on CPU when no GPU is
present; the test runs either way) against a float64 CPU reference."""

from __future__ import annotations

import pytest
import torch
from naive_core import F64, gen, matrix_with_spectrum, random_uploads, rel_err

from fedhl.core import ClientUpdate, FedHL, LoRAScaling, SVDConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"q": (96, 64), "v": (64, 160), "o": (48, 48)}
RANKS = {
    "a": {"q": 2, "v": 8, "o": 4},
    "b": {"q": 8, "v": 4, "o": 1},
    "c": {"q": 4, "v": 2, "o": 8},
}
N = {"a": 30, "b": 50, "c": 20}


def decaying(shape: tuple[int, int], seed: int) -> torch.Tensor:
    k = min(shape)
    return matrix_with_spectrum(*shape, [0.8**j for j in range(k)], gen(seed))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "svd",
    [SVDConfig(method="exact"), SVDConfig(method="randomized", oversample=8)],
    ids=["exact", "randomized"],
)
def test_fedhl_round_float32_on_device_matches_float64_cpu(svd: SVDConfig) -> None:
    # Prepare: the same W_t and uploads, once as a float32 state on `DEVICE`, once float64 CPU
    W64 = {m: decaying(s, 10 + i) for i, (m, s) in enumerate(SHAPES.items())}
    up64 = random_uploads(RANKS, SHAPES, N, gen(20), scale=0.1)
    up32 = [
        ClientUpdate(u.client_id, {m: f.to("cpu", torch.float32) for m, f in u.factors.items()}, u.n_examples)
        for u in up64
    ]
    dev = FedHL(LoRAScaling(16.0), device=DEVICE, compute_dtype=torch.float32, svd=svd)
    ref = FedHL(LoRAScaling(16.0), svd=SVDConfig(method="exact"))
    states = {}
    for name, strategy, dtype in (("dev", dev, torch.float32), ("ref", ref, F64)):
        state = strategy.init_state(SHAPES, dtype=dtype)
        state.round = 4
        for m, w in W64.items():
            state.dense[m] = w.to(dtype)
        states[name] = (strategy, state)
    # Execute
    out = {}
    for name, (strategy, state) in states.items():
        plan = strategy.plan_round(state, RANKS)
        starts = {c: strategy.client_start(state, plan, c) for c in RANKS}
        new, report = strategy.aggregate(state, plan, up32 if name == "dev" else up64)
        out[name] = (plan, starts, new, report)
    # Assert
    plan_d, starts_d, new_d, rep_d = out["dev"]
    _, starts_r, new_r, rep_r = out["ref"]
    assert all(s.U.device.type == DEVICE and s.U.dtype == torch.float32 for s in plan_d.spectra.values())
    for m in SHAPES:
        assert new_d.dense[m].dtype == torch.float32 and new_d.dense[m].device.type == "cpu"
        assert rel_err(new_d.dense[m], new_r.dense[m]) <= 1e-4
        for c in RANKS:
            fd, fr = starts_d[c].factors[m], starts_r[c].factors[m]
            assert rel_err(fd.B @ fd.A, fr.B @ fr.A) <= 1e-4
    assert rep_d.weights == pytest.approx(rep_r.weights, rel=1e-4)
    assert rep_d.truncation_errors == pytest.approx(rep_r.truncation_errors, rel=1e-4)
    assert rep_d.update_norms == pytest.approx(rep_r.update_norms, rel=1e-4)
    assert rep_d.global_update_norm == pytest.approx(rep_r.global_update_norm, rel=1e-4)
