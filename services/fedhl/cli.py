"""The `fedhl` command. Services get their own subcommands as they land."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__, admincli
from .redact import install_log_redaction, redact
from .settings import Settings, SettingsError


def _info(args: argparse.Namespace) -> int:
    import torch

    from .core import STRATEGIES, WEIGHT_PRESETS

    info = {
        "version": __version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "strategies": sorted(STRATEGIES),
        "fedhl_weight_presets": sorted(WEIGHT_PRESETS),
    }
    print(json.dumps(info, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.job is not None:
        return admincli.export_job(args)
    if args.state is None or args.alpha is None or args.base_model is None:
        print("fedhl export: give --job, or --state with --alpha and --base-model", file=sys.stderr)
        return 2
    from .codec import load_state
    from .core import LoRAScaling
    from .export import export_peft_adapter

    state = load_state(args.state)
    if not state.dense:
        print("export needs a dense state (fedhl, flexlora, flora)", file=sys.stderr)
        return 2
    report = export_peft_adapter(
        state.dense,
        args.out,
        rank=args.rank,
        scaling=LoRAScaling(args.alpha, args.scale_rule or "standard"),
        base_model_name_or_path=args.base_model,
        task_type=args.task_type,
        extras=state.extras or None,
    )
    print(
        json.dumps(
            {
                "out": str(args.out),
                "rank": args.rank,
                "dropped_energy_fraction": report.dropped_fraction,
            }
        )
    )
    return 0


def _settings() -> Settings:
    from .settings import get_settings

    return get_settings()


def _migrate(args: argparse.Namespace) -> int:
    from .storage.db import migrate

    settings = _settings()
    migrate(settings.database_url)
    print(f"database at head: {redact(settings.database_url)}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    import json

    from .storage.blobs import open_blob_store, resolve_blob_url
    from .storage.db import session_factory
    from .storage.gc import collect

    settings = _settings()
    engine = settings.engine()
    try:
        blobs = open_blob_store(resolve_blob_url(settings.blob_url), settings.s3)
        report = collect(session_factory(engine), blobs, settings.retention, dry_run=args.dry_run)
    finally:
        engine.dispose()
    for key in report.deleted:
        print(f"{'would delete' if args.dry_run else 'deleted'} blob {key}")
    for upload_id in report.staging_deleted:
        print(f"{'would delete' if args.dry_run else 'deleted'} staged upload {upload_id}")
    print(json.dumps(report.summary()))
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    # The process wiring: the coordinator gets the aggregation worker loop from here, so the
    # two services never import each other.
    from .aggregation.worker import run_worker
    from .coordinator.main import serve

    serve(_settings(), auto_migrate=args.migrate, aggregator=run_worker)
    return 0


def _aggregator(args: argparse.Namespace) -> int:
    from .aggregation.worker import serve_worker

    serve_worker(_settings(), consumer=args.name)
    return 0


def _agent(args: argparse.Namespace) -> int:
    from .agent.runtime import AgentConfig, serve_agent

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    serve_agent(AgentConfig.from_env(**flags))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .certs import ensure_certs

    names = [n.strip() for value in args.name for n in value.split(",") if n.strip()]
    report = ensure_certs(Path(args.out), names, ca_out=Path(args.ca_out) if args.ca_out else None)
    print("\n".join(report.lines(Path(args.out))))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run

    return run(args)


def _simulate(args: argparse.Namespace) -> int:
    from .demo.simulate import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhl", description="Federated heterogeneous-rank LoRA fine-tuning.")
    p.add_argument("--version", action="version", version=f"fedhl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, devices and available strategies").set_defaults(func=_info)

    e = sub.add_parser("export", help="global state file → PEFT LoRA adapter directory at a chosen rank")
    e.add_argument("--state", help="state file (safetensors) written by fedhl")
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("--alpha", type=float, help="the job's lora_alpha (with --job: the job's)")
    e.add_argument("--scale-rule", choices=["standard", "rslora"], help="default: standard (with --job: the job's)")
    e.add_argument("--base-model", help="base model path or hub id, recorded in the config (with --job: the job's)")
    e.add_argument("--task-type", default=None, help="peft task type, e.g. SEQ_CLS or CAUSAL_LM")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)
    admincli.register(sub, export=e)  # jobs, tokens, agents; export --job

    sub.add_parser(
        "migrate", help="bring the database schema to the latest migration (FEDHL_DATABASE_URL)"
    ).set_defaults(func=_migrate)
    gc = sub.add_parser(
        "gc", help="delete blobs no job, round or recent checkpoint references, and stale partial uploads"
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    gc.set_defaults(func=_gc)
    c = sub.add_parser("coordinator", help="run the coordinator: gRPC for agents, REST admin API, scheduler")
    c.add_argument("--migrate", action="store_true", help="run migrations first (embedded deployments)")
    c.set_defaults(func=_coordinator)
    t = sub.add_parser(
        "certs",
        help="create a private CA and a TLS server certificate for the coordinator (kept while valid)",
        description="Writes ca.crt, ca.key, server.crt and server.key (PEM, keys 0600) into --out. Run again, "
        "it keeps the CA and a server certificate that still covers every --name for 30 days or more.",
    )
    t.add_argument("--out", required=True, help="directory of the CA and the server certificate")
    t.add_argument("--ca-out", help="also copy ca.crt into this directory (for agents: it holds no key)")
    t.add_argument(
        "--name",
        action="append",
        required=True,
        help="DNS name or IP address agents connect to; repeat, or separate with commas",
    )
    t.set_defaults(func=_certs)
    a = sub.add_parser("aggregator", help="run an aggregation worker (needs FEDHL_REDIS_URL); scale by running more")
    a.add_argument("--name", default=None, help="consumer name in the stream group (default: host-pid)")
    a.set_defaults(func=_aggregator)
    g = sub.add_parser("agent", help="run a client agent: train LoRA on local data for a coordinator")
    g.add_argument("--coordinator", help="host:port of the coordinator's gRPC endpoint [FEDHL_AGENT_COORDINATOR]")
    g.add_argument("--token", help="enrolment token, used once [FEDHL_AGENT_TOKEN]")
    g.add_argument("--data", help="local training data, JSONL or CSV [FEDHL_AGENT_DATA]")
    g.add_argument("--name", help="a name for this agent (default: host name) [FEDHL_AGENT_NAME]")
    g.add_argument("--state-dir", help="where the credential is kept (default ~/.fedhl-agent) [FEDHL_AGENT_STATE_DIR]")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present) [FEDHL_AGENT_DEVICE]")
    g.add_argument("--memory-budget-bytes", type=int, help="memory the agent may use [FEDHL_AGENT_MEMORY_BUDGET_BYTES]")
    g.add_argument("--base-model", help="local path of the job's base model, if not where the job says")
    g.add_argument("--tls-ca", help="CA certificate that verifies the coordinator (enables TLS) [FEDHL_AGENT_TLS_CA]")
    g.add_argument(
        "--tls", action="store_true", default=None, help="TLS verified by the system's root CAs [FEDHL_AGENT_TLS]"
    )
    g.add_argument("--tls-server-name", help="name to verify, if not the address's host [FEDHL_AGENT_TLS_SERVER_NAME]")
    g.add_argument("--tls-cert", help="client certificate (mTLS) [FEDHL_AGENT_TLS_CERT]")
    g.add_argument("--tls-key", help="client key (mTLS) [FEDHL_AGENT_TLS_KEY]")
    g.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow plaintext to a coordinator on another machine (development only) [FEDHL_AGENT_INSECURE]",
    )
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.set_defaults(func=_agent)
    d = sub.add_parser("demo", help="coordinator + N agents on this machine: MiniLM-L6 on review snippets")
    from .demo.run import add_arguments

    add_arguments(d)
    d.set_defaults(func=_demo)
    m = sub.add_parser("simulate", help="the demo's federated job in one process (no gRPC, no database): sweeps")
    from .demo.simulate import add_arguments as simulate_arguments

    simulate_arguments(m)
    m.set_defaults(func=_simulate)
    return p


def _user_errors() -> tuple[type[Exception], ...]:
    """What a command raises for bad input or configuration (anything else is a bug: traceback)."""
    from pydantic import ValidationError

    from .certs import CertError
    from .codec import CodecError
    from .data import DataError
    from .export import ExportError
    from .modeling import ModelError

    return (
        SettingsError,
        CertError,
        CodecError,
        DataError,
        ExportError,
        ModelError,
        ValidationError,
        json.JSONDecodeError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("FEDHL_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
    install_log_redaction()  # no password or token reaches a log line
    try:
        code: int = args.func(args)
    except _user_errors() as err:  # bad input or configuration: a message, not a traceback
        print(f"fedhl {args.command}: {redact(str(err))}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
