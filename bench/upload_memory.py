"""Coordinator memory while 8 uploads of a 256 MB adapter are validated at once.

Runs the validation step of the upload path (what `AgentService.upload` does once the bytes
are staged) in 8 threads on 8 distinct 256 MB safetensors files, in a fresh process per mode:

- `before`: the old path, `validate_update(decode_file(path))` (the whole payload in memory);
- `after`: `validate_update_file` (header first, then one tensor at a time via safe_open)
  behind the coordinator's validation semaphore (FEDHL_MAX_CONCURRENT_VALIDATIONS, default 4).

Prints one JSON line per mode: peak anonymous RSS (RssAnon sampled every 5 ms: the memory
the process really owns; file pages of the memory map are reclaimable page cache) and the
kernel's VmHWM (peak RSS, file pages included).

    PYTHONPATH=services nice -n 10 .venv/bin/python bench/upload_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

UPLOADS = 8
MODULES, DIM, RANK = 128, 4096, 64  # B(4096, 64) + A(64, 4096) fp32 = 2 MiB per module: 256 MiB


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def make_files(d: Path) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    paths = []
    for i in range(UPLOADS):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for m in range(MODULES):
            tensors[f"lora_B::m{m}"] = torch.randn(DIM, RANK, generator=g)
            tensors[f"lora_A::m{m}"] = torch.randn(RANK, DIM, generator=g)
        p = d / f"u{i}.safetensors"
        save_file(tensors, str(p))
        paths.append(p)
        del tensors
    return paths


def run(mode: str, d: Path) -> None:
    from fedhl.codec import Expected, decode_file, validate_update, validate_update_file
    from fedhl.settings import Settings

    exp = Expected({f"m{m}": (DIM, DIM) for m in range(MODULES)}, RANK, {})
    paths = sorted(d.glob("u*.safetensors"))
    slots = threading.BoundedSemaphore(Settings().max_concurrent_validations)
    base = status_kb("RssAnon")
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], status_kb("RssAnon"))
            time.sleep(0.005)

    def validate(p: Path) -> None:
        if mode == "before":
            validate_update(decode_file(p), exp)
        else:
            with slots:
                validate_update_file(p, exp)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=validate, args=(p,)) for p in paths]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "mode": mode,
                "uploads": len(paths),
                "upload_mb": round(paths[0].stat().st_size / 2**20),
                "peak_anon_rss_mb": round(peak[0] / 1024),
                "baseline_anon_rss_mb": round(base / 1024),
                "vm_hwm_mb": round(status_kb("VmHWM") / 1024),
                "seconds": round(seconds, 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    if len(sys.argv) == 3:
        run(sys.argv[1], Path(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory(prefix="fedhl-upload-mem-") as tmp:
        make_files(Path(tmp))
        for mode in ("before", "after"):
            subprocess.run([sys.executable, __file__, mode, tmp], check=True)


if __name__ == "__main__":
    main()
