"""`fedhl export --job ID`: download a job's global checkpoint over the admin API and write
it as a PEFT adapter with the same code as the file-based export (`fedhl.export`)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .client import AdminClient, AdminError

PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def export_job(args: argparse.Namespace, api: AdminClient) -> int:
    from ..codec import load_state
    from ..core import LoRAScaling
    from ..export import export_peft_adapter

    job = api.get(f"/jobs/{args.job}")
    cfg = job["config"]
    version = args.round
    if version is None:
        checkpoints = api.get(f"/jobs/{args.job}/checkpoints")
        if not checkpoints:
            raise AdminError(f"job {args.job} has no checkpoint yet (no round committed)")
        version = max(c["round_number"] for c in checkpoints)
    with tempfile.TemporaryDirectory(prefix="fedhl-export-") as tmp:
        path = Path(tmp) / "state.safetensors"
        size = api.download(f"/jobs/{args.job}/checkpoints/{version}/state", path)
        state = load_state(path)
    if not state.dense:
        raise AdminError(f"job {args.job} uses strategy {job['strategy']!r}, whose state has no dense update to export")
    report = export_peft_adapter(
        state.dense,
        args.out,
        rank=args.rank,
        scaling=LoRAScaling(args.alpha or float(cfg["lora_alpha"]), args.scale_rule or cfg["scale_rule"]),
        base_model_name_or_path=args.base_model or cfg["base_model"],
        task_type=args.task_type or PEFT_TASK_TYPES.get(cfg["task_type"]),
        extras=state.extras or None,
    )
    print(
        json.dumps(
            {
                "out": str(args.out),
                "job": args.job,
                "round": version,
                "rank": args.rank,
                "state_bytes": size,
                "dropped_energy_fraction": report.dropped_fraction,
            }
        )
    )
    return 0
