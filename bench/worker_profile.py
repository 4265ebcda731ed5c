"""Where one aggregation task's memory goes: the worker's compute and publish path, in process,
phase by phase (issue 17).

Two steps, each in a fresh process so the profile's baseline is a worker's, not the setup's:

    PYTHONPATH=services python bench/worker_profile.py setup   --dir /tmp/prof --layers 4 --dim 4096 --clients 50
    PYTHONPATH=services python bench/worker_profile.py profile --dir /tmp/prof

`setup` writes a round-0 job's inputs into a file blob store under `--dir` (the spectra the
coordinator publishes, one upload per client made from its start package plus noise, as
`bench/aggregation.py --worker` does). `profile` imports what `fedhl aggregator` imports, then
runs `compute_shard_file` and `publish` exactly as the worker does, sampling the process's
RSS (anonymous and file-backed, from /proc/self/status) every 5 ms and attributing each
sample to the phase running then; it prints one JSON line: peak RSS per phase, the kernel's
VmHWM, glibc's held-but-free bytes (mallinfo2) after each phase, and the content hashes of the
published artifacts (to compare two code versions)."""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) // 1024
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _malloc_free_mb() -> float | None:
    """Bytes glibc holds in its arenas but has not handed out (free, not returned to the OS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    return round(f().fordblks / 2**20, 1)


class Sampler:
    def __init__(self) -> None:
        self.phase = "baseline"
        self.peak: dict[str, dict[str, int]] = {}
        self.free_after: dict[str, float | None] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sample()

    def sample(self) -> None:
        s = _status()
        p = self.peak.setdefault(self.phase, {"rss": 0, "anon": 0, "file": 0})
        if s["VmRSS"] > p["rss"]:
            p.update(rss=s["VmRSS"], anon=s["RssAnon"], file=s["RssFile"])

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        outer = self.phase
        self.sample()
        self.phase = phase
        try:
            yield
        finally:
            self.sample()
            self.free_after[phase] = _malloc_free_mb()
            self.phase = outer

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        fn: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(fn)
        def wrapped(*a: Any, **kw: Any) -> Any:
            with self.during(phase):
                return fn(*a, **kw)

        setattr(owner, name, wrapped)

    def start(self) -> None:
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def setup(args: argparse.Namespace) -> None:
    import torch

    from fedhl.artifacts import initial_state, publish_round_artifacts
    from fedhl.codec import decode_start, encode_update
    from fedhl.jobspec import JobSpec
    from fedhl.storage.blobs import FileBlobStore

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    blobs = FileBlobStore(d / "blobs")
    modules = {
        f"model.layers.{i}.self_attn.{p}": [args.dim, args.dim]
        for i in range(args.layers)
        for p in ("q_proj", "v_proj")
    }
    rank_set = [int(r) for r in args.ranks.split(",")]
    spec = JobSpec.model_validate(
        {
            "name": "profile",
            "base_model": "none",
            "target_modules": ["q_proj", "v_proj"],
            "module_shapes": modules,
            "rank_set": rank_set,
            "rounds": 1,
            "seed": args.seed,
        }
    )
    strategy = spec.build_strategy()
    plan_key, start_keys = publish_round_artifacts(blobs, strategy, initial_state(strategy, spec), spec, "profile-job")
    g = torch.Generator().manual_seed(args.seed)
    uploads, rank_of = [], {}
    for i in range(args.clients):
        agent = f"client-{i:03d}"
        r = rank_set[int(torch.randint(len(rank_set), (1,), generator=g))]
        start = decode_start(blobs.get_bytes(start_keys[str(r)]))
        trained = {
            m: type(f)(
                f.B + 1e-3 * torch.randn(f.B.shape, generator=g), f.A + 1e-3 * torch.randn(f.A.shape, generator=g)
            )
            for m, f in start.factors.items()
        }
        uploads.append((agent, blobs.put_bytes(encode_update(trained, start.extras)), 100))
        rank_of[agent] = r
    inputs = {"spec": spec.model_dump(mode="json"), "plan_key": plan_key, "uploads": uploads, "rank_of": rank_of}
    (d / "inputs.json").write_text(json.dumps(inputs))
    print(json.dumps({"setup": str(d), "modules": len(modules), "clients": args.clients}))


def profile(args: argparse.Namespace) -> None:
    sampler = Sampler()
    sampler.start()
    with sampler.during("imports"):
        import torch

        import fedhl.cli  # noqa: F401  (what `fedhl aggregator` imports before its loop)
        from fedhl.aggregation import compute, shards
        from fedhl.aggregation import worker as _worker  # noqa: F401
        from fedhl.aggregation.inputs import RoundInputs
        from fedhl.backends import Deps
        from fedhl.core.strategies.base import Strategy
        from fedhl.jobspec import JobSpec
        from fedhl.storage.blobs import FileBlobStore

    d = Path(args.dir)
    raw = json.loads((d / "inputs.json").read_text())
    spec = JobSpec.model_validate(raw["spec"])
    inp = RoundInputs(
        round_id=1,
        job_id="profile-job",
        number=0,
        spec=spec,
        uploads=[tuple(u) for u in raw["uploads"]],  # type: ignore[misc]
        rank_of=raw["rank_of"],
        state_key=None,
        plan_key=raw["plan_key"],
        shards=1,
    )
    blobs = FileBlobStore(d / "blobs")
    deps = Deps(None, blobs, None, "cpu")  # type: ignore[arg-type]  (compute reads blobs only)
    strategy_cls = type(spec.build_strategy())
    if not args.no_allocator_tuning:
        try:  # what `fedhl aggregator` does at start, where the tree has it
            from fedhl.aggregation.allocator import fix_mmap_threshold
        except ImportError:
            pass
        else:
            fix_mmap_threshold()
    sampler.wrap(compute, "get_spectra", "load_spectra")
    sampler.wrap(Strategy, "_screen_module", "screen")
    sampler.wrap(strategy_cls, "_merge_module", "merge")
    sampler.wrap(compute, "next_round_artifacts", "next_round")
    sampler.wrap(compute.ShardWriter, "add", "write_shard")
    base = _status()
    t0 = time.perf_counter()
    with sampler.during("compute_other"):
        out = d / "shard.safetensors"
        compute.compute_shard_file(deps, inp, 0, out)
    t1 = time.perf_counter()
    with sampler.during("publish"):
        key = blobs.put_file(out)
        published = shards.publish(blobs, [key], {"job_id": "profile-job", "round": "1"})
    t2 = time.perf_counter()
    sampler.stop()
    end = _status()
    state_mb = 4 * sum(o * i for o, i in spec.module_shapes.values()) / 2**20

    def sha(k: str) -> str:
        return hashlib.sha256(blobs.get_bytes(k)).hexdigest()[:16]

    def tensors_sha(k: str) -> str:  # spectra metadata records SVD seconds: hash the values only
        from safetensors.torch import load

        h = hashlib.sha256()
        for name, t in sorted(load(blobs.get_bytes(k)).items()):
            h.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    result = {
        "tag": args.tag,
        "modules": len(spec.module_shapes),
        "clients": len(inp.uploads),
        "state_mb": state_mb,
        "after_imports_rss_mb": base["VmRSS"],
        "peak_rss_mb_by_phase": {k: v["rss"] for k, v in sampler.peak.items()},
        "anon_mb_at_phase_peak": {k: v["anon"] for k, v in sampler.peak.items()},
        "file_mb_at_phase_peak": {k: v["file"] for k, v in sampler.peak.items()},
        "malloc_free_mb_after": sampler.free_after,
        "vm_hwm_mb": end["VmHWM"],
        "hwm_over_state": round(end["VmHWM"] / state_mb, 2),
        "compute_s": round(t1 - t0, 2),
        "publish_s": round(t2 - t1, 2),
        "hashes": {
            "state": sha(published.state_key),
            "spectra_values": tensors_sha(published.plan_key) if published.plan_key else None,
            **{f"start-{r}": sha(k) for r, k in published.start_keys.items()},
        },
    }
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["setup", "profile"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--ranks", default="4,8,16,32,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-allocator-tuning", action="store_true", help="leave glibc's mmap threshold dynamic")
    ap.add_argument("--services", default=str(ROOT / "services"), help="the fedhl source tree to profile")
    args = ap.parse_args()
    sys.path.insert(0, args.services)
    setup(args) if args.step == "setup" else profile(args)


if __name__ == "__main__":
    main()
