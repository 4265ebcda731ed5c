"""A federated job in one process, for research sweeps: no gRPC, no database, no blob store.

Each round does what the distributed path does, with the same functions:

    spectra, starts = next_round_artifacts(strategy, state, rank_set)   # as the aggregator
    for each selected client:                                            # as `fedhl agent`
        model = prepare(copy of W0, starts[rank] + global head, ...)
        result = train(model, tok, its examples, spec.train, ..., seed=seed·100003 + round)
    state, report = strategy.aggregate(state, plan, updates)             # as the aggregator
    metrics = evaluate(W0 + W_t, head)                                   # as the server

so a simulated job reaches the state the coordinator and agents reach for the same spec, data
and seed, up to float32 rounding from thread counts (~1e-6 relative; pinned by
tests/agent/test_agent_e2e.py). What differs: client selection (here a
seeded sample of `participation × clients` per round, there the scheduler's), and nothing is
serialised (safetensors round trips of float32 tensors are exact, so this changes no value) —
except under FedHL's `full` view, whose factored downlink runs as in the distributed path: each
round's change is encoded (`codec.encode_change`), and each simulated client holds the version
it last trained on, takes the chain of changes or the dense state the coordinator would offer
(`core.downlink.choose_chain`), rebuilds `W_t` with the agents' function, checks its module
hashes against the server's, and folds `W_t − s·B⁰A⁰` into its frozen base.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .agent.globalcache import full_view_start
from .agent.trainer import prepare, train
from .aggregation.validate import Screen, history_rounds, validation_examples, validation_screen, window_history
from .artifacts import downlink_parts, initial_state, next_round_artifacts
from .codec import decode_change, encode_change, encode_start, encode_update, state_metadata
from .core import AggregationError, ClientStart, ClientUpdate, GlobalState, RoundPlan, Spectrum, Strategy
from .core.downlink import Change, choose_chain, mismatched, rebuild, state_hashes
from .core.scaling import LoRAScaling
from .data import Example
from .evaluation import evaluate
from .export import effective_updates
from .jobspec import JobSpec
from .modeling import load_base, resolve_shapes
from .round_report import RoundReport, downlink_summary
from .tensorfile import header

__all__ = ["SimClient", "client_seed", "select_clients", "simulate"]

RoundCallback = Callable[[dict[str, Any]], None]
# (round, the client's start, its update) → the update as uploaded, or None: refused at the edge
Tamper = Callable[[int, ClientStart, ClientUpdate], "ClientUpdate | None"]


@dataclass(frozen=True)
class SimClient:
    """One simulated agent: its name (the rank policy's key), rank and local data."""

    name: str
    rank: int
    examples: Sequence[Example]


def client_seed(job_seed: int, round_: int) -> int:
    """The training seed `fedhl agent` uses for a task of this job and round."""
    return job_seed * 100_003 + round_


def select_clients(clients: Sequence[SimClient], participation: float, seed: int, round_: int) -> list[SimClient]:
    """`ceil(participation × n)` clients (at least one), a seeded sample per round, in input order."""
    if not 0 < participation <= 1:
        raise ValueError(f"participation must be in (0, 1], got {participation}")
    k = max(1, math.ceil(participation * len(clients)))
    if k >= len(clients):
        return list(clients)
    chosen = set(random.Random(f"{seed}:{round_}").sample(range(len(clients)), k))
    return [c for i, c in enumerate(clients) if i in chosen]


class SimDownlink:
    """The factored downlink of one simulated job: the round changes as encoded, the version
    each client holds, and the states the clients rebuilt (one per version, shared: the
    rebuild is deterministic)."""

    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        self.changes: dict[int, bytes] = {}  # version -> the change that produced it, encoded
        self.held: dict[str, int] = {}  # client -> version
        self.rebuilt: dict[int, dict[str, torch.Tensor]] = {0: {m: torch.zeros(s) for m, s in shapes.items()}}

    def publish(self, strategy: Strategy, plan: RoundPlan, state: GlobalState) -> None:
        """After the merge of round t: the change to version t+1, as the aggregator writes it."""
        changes: dict[str, Change] = {}
        hashes: dict[str, str] = {}
        for m, w in state.dense.items():
            c, h = downlink_parts(strategy, plan, m, w)
            changes.update(c)
            hashes.update(h)
        self.changes[state.round] = encode_change(state.round, changes, hashes)

    def obtain(self, client: str, state: GlobalState) -> tuple[dict[str, torch.Tensor], str, int]:
        """(W_t as the client rebuilds it, route, bytes downloaded) — checked against the
        server's hashes, as `fedhl agent` checks them."""
        t, have = state.round, self.held.get(client)
        dense_bytes = _state_bytes(state)
        chain = choose_chain(have, t, {v: len(b) for v, b in self.changes.items()}, dense_bytes)
        if chain is None:
            modules, route, got = {m: w.clone() for m, w in state.dense.items()}, "state", dense_bytes
        elif not chain:
            modules, route, got = self.rebuilt[t], "held" if t else "zeros", 0
        elif t in self.rebuilt and (have or 0) + 1 == chain[0]:
            modules, route, got = self.rebuilt[t], "chain", sum(len(self.changes[v]) for v in chain)
        else:
            base = self.rebuilt[chain[0] - 1]
            modules = rebuild(base, [decode_change(self.changes[v]).changes for v in chain])
            route, got = "chain", sum(len(self.changes[v]) for v in chain)
        bad = mismatched(modules, state_hashes(state.dense))
        if bad:
            raise RuntimeError(f"client {client}: the rebuilt global update of version {t} disagrees on {bad[:3]}")
        self.rebuilt[t] = modules
        self.held[client] = t
        keep = set(self.held.values()) | {0, t}
        self.rebuilt = {v: w for v, w in self.rebuilt.items() if v in keep}
        return modules, route, got


def _artifacts(
    strategy: Strategy, state: GlobalState, rank_set: Sequence[int]
) -> tuple[dict[str, Spectrum], dict[int, ClientStart], dict[int, int]]:
    """The round's spectra and start packages (as the aggregator publishes them), with each
    package's size in bytes."""
    spectra, starts = next_round_artifacts(strategy, state, rank_set)
    sizes = {
        r: len(encode_start(ClientStart(s.factors, s.base_residual, dict(state.extras)))) for r, s in starts.items()
    }
    return spectra, starts, sizes


def _state_bytes(state: GlobalState) -> int:
    """Size of the dense state file (`codec.save_state`'s layout)."""
    specs = {f"dense::{m}": (w.dtype, tuple(w.shape)) for m, w in state.dense.items()}
    specs.update({f"extra::{k}": (v.dtype, tuple(v.shape)) for k, v in state.extras.items()})
    values = sum(w.numel() * w.element_size() for w in [*state.dense.values(), *state.extras.values()])
    return len(header(specs, state_metadata(state.round))) + values


def _check(spec: JobSpec, clients: Sequence[SimClient]) -> None:
    if not clients:
        raise ValueError("no clients")
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise ValueError(f"client names must be unique: {names}")
    for c in clients:
        if c.rank not in spec.rank_set:
            raise ValueError(f"client {c.name!r} has rank {c.rank}, not in the job's rank_set {spec.rank_set}")
        if not c.examples:
            raise ValueError(f"client {c.name!r} has no examples")


def simulate(
    spec: JobSpec,
    clients: Sequence[SimClient],
    test: Sequence[Example],
    *,
    participation: float = 1.0,
    device: str = "cpu",
    on_round: RoundCallback | None = None,
    tamper: Tamper | None = None,
    keep_going: bool = False,
) -> tuple[GlobalState, list[dict[str, Any]]]:
    """Run `spec.rounds` rounds; return the final global state and one row per round (the
    demo's `results.json` row shape, plus `bytes_uploaded`: the agents' upload payloads, and
    `report`: the round report, as the REST API serves it).

    `spec.module_shapes`/`extra_shapes` are resolved from the base model when empty, as the
    coordinator does at job creation. Evaluation on `test` runs every
    `spec.evaluation.every` rounds (accuracy/loss, or loss/perplexity for causal LM).

    `tamper` rewrites (or refuses, with None) an update before the merge: bench/robustness.py's
    hostile agent. `keep_going`: a round whose merge fails keeps the previous state and its row
    says why (`failed`), as the coordinator does; else the AggregationError propagates."""
    _check(spec, clients)
    if not spec.module_shapes:
        shapes, extras = resolve_shapes(spec.base_model, spec.target_modules, spec.task_type, spec.num_labels)
        spec = spec.model_copy(update={"module_shapes": shapes, "extra_shapes": extras})
    strategy = spec.build_strategy()
    strategy.device = torch.device(device)
    scaling = LoRAScaling(spec.lora_alpha, spec.scale_rule)
    validation_examples(spec)  # an unreadable validation split fails here, before any training
    base, tok = load_base(spec.base_model, spec.task_type, spec.num_labels, device, init_seed=spec.seed)
    state = initial_state(strategy, spec)
    modules = list(spec.module_shapes)
    rows: list[dict[str, Any]] = []
    screened: dict[int, dict[str, Any] | None] = {}  # round -> the validation screen's summary
    downlink = SimDownlink(dict(spec.module_shapes)) if strategy.factored_downlink else None
    ready: tuple[dict[str, Spectrum], dict[int, ClientStart], dict[int, int]] | None = None
    for t in range(spec.rounds):
        t0 = time.perf_counter()
        chosen = select_clients(clients, participation, spec.seed, t)
        if ready is None:  # this round's artifacts (computed at the end of the last one, as the aggregator does)
            ready = _artifacts(strategy, state, spec.rank_set)
        spectra, starts, start_bytes = ready
        updates, train_s, sent = [], [], 0
        received: dict[str, int] = {}
        routes: dict[str, str] = {}
        for c in chosen:
            s = starts[c.rank]
            start = ClientStart(s.factors, s.base_residual, dict(state.extras))
            received[c.name] = start_bytes[c.rank]
            if downlink is not None:  # the factored downlink, as `fedhl agent` runs it
                held, routes[c.name], got = downlink.obtain(c.name, state)
                received[c.name] += got
                start = full_view_start(start, held, scaling)
            t_c = time.perf_counter()
            model = prepare(copy.deepcopy(base), start, modules, c.rank, scaling, head_params=list(start.extras))
            result = train(model, tok, c.examples, spec.train, spec.task_type, device, seed=client_seed(spec.seed, t))
            train_s.append(time.perf_counter() - t_c)
            sent += len(encode_update(result.factors, result.extras))
            upd = ClientUpdate(c.name, result.factors, result.n_examples, result.extras, result.metrics)
            uploaded = upd if tamper is None else tamper(t, start, upd)
            if uploaded is not None:
                updates.append(uploaded)
            del model
        t_agg = time.perf_counter()
        plan = RoundPlan(round=t, ranks={c.name: dict.fromkeys(modules, c.rank) for c in chosen}, spectra=spectra)
        try:
            # the validation screen, as the aggregation worker runs it (aggregation/validate.py)
            # with the earlier rounds' effects from their summaries, as the worker reads them from
            # the committed round reports
            history = window_history([screened.get(r) for r in history_rounds(spec, t)])
            screen = (
                validation_screen(
                    strategy, state, plan, updates, spec, history=history, base=(base, tok), device=device
                )
                if spec.defence.validation is not None
                else Screen()
            )
            t_merge = time.perf_counter()
            state, report = strategy.aggregate(state, plan, updates, inplace=not keep_going, left_out=screen.left_out)
            if downlink is not None:
                downlink.publish(strategy, plan, state)
        except AggregationError as e:
            ready = None
            if not keep_going:
                raise
            state = GlobalState(state.round + 1, state.dense, state.factors, state.extras)  # previous model kept
            row = {"round": t, "failed": str(e), "accuracy": rows[-1]["accuracy"] if rows else float("nan")}
            rows.append(row)
            if on_round is not None:
                on_round(row)
            continue
        aggregate_s = time.perf_counter() - t_merge
        validate_s = t_merge - t_agg
        screened[t] = screen.summary
        ev: dict[str, float] = {}
        t_ev = time.perf_counter()
        if test and (t + 1) % spec.evaluation.every == 0:
            dense = effective_updates(strategy, state)
            ev = evaluate(
                (base, tok),
                spec.task_type,
                spec.num_labels,
                dense,
                state.extras,
                test,
                max_seq_len=spec.train.max_seq_len,
                device=device,
            )
        evaluate_s = time.perf_counter() - t_ev
        timings = {"aggregate_s": aggregate_s, "evaluate_s": evaluate_s}
        if screen.summary is not None:
            timings["validate_s"] = validate_s
        round_report = RoundReport.of(report, timings=timings, evaluation=ev or None, validation=screen.summary)
        ready = _artifacts(strategy, state, spec.rank_set)  # the next round's, whose sizes the report gives
        sizes = {f"start:{r}": b for r, b in ready[2].items()} | {"state": _state_bytes(state)}
        if downlink is not None:
            sizes["change"] = len(downlink.changes[state.round])
        round_report.downlink = downlink_summary(strategy, sizes)
        row = {
            "round": t,
            "accuracy": float(ev.get("accuracy", float("nan"))),
            "loss": float(ev.get("loss", float("nan"))),
            "participants": len(chosen),
            "ranks": sorted(c.rank for c in chosen),
            "weights": round_report.weights,
            "truncation_errors": round_report.truncation_errors,
            "energy_kept": round_report.energy_kept,
            "train_loss_last": {u.client_id: float(u.metrics.get("loss_last", math.nan)) for u in updates},
            "bytes_uploaded": sent,
            "bytes_downloaded": received,  # per client: its start package (+ change, chain or state)
            "downlink_routes": routes,  # full view: how each client obtained the global update
            "seconds": time.perf_counter() - t0,
            "time": {
                "train_max_s": max(train_s),
                "train_sum_s": sum(train_s),
                "aggregate_s": aggregate_s,
                "validate_s": validate_s,
                "evaluate_s": evaluate_s,
            },
            "report": round_report.to_dict(),
            "cosines": report.cosines,  # the direction screen's measurements (core/defence.py)
            "validation": screen.summary,  # the validation screen's (aggregation/validate.py)
        }
        rows.append(row)
        if on_round is not None:
            on_round(row)
    return state, rows
