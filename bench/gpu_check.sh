#!/usr/bin/env bash
# The one-shot GPU check (bench/gpu_check.py): prints one JSON summary line; exit 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec "$PY" bench/gpu_check.py "$@"
