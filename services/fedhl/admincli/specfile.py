"""Job spec files (YAML or JSON), with `--set path=value` overrides, validated locally
against the same `JobSpec` model the coordinator validates with, so a bad field is named
before anything is sent."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .client import AdminError, field_error


def _parse(path: Path) -> Any:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as e:
        raise AdminError(f"cannot read {path}: {e.strerror or e}", 2) from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)  # YAML is a superset of JSON: any other suffix parses too
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise AdminError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}", 2) from None


def apply_override(spec: dict[str, Any], assignment: str) -> None:
    """`selection.min_clients=4` sets spec["selection"]["min_clients"] = 4 (the value is read
    as YAML, so numbers, booleans, null and [lists] keep their type)."""
    path, sep, raw = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise AdminError(f"--set expects FIELD.PATH=VALUE, got {assignment!r}", 2)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise AdminError(f"--set {path}: cannot read {raw!r}: {e}", 2) from None
    node = spec
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise AdminError(f"--set {path}: {k} is not a mapping in the spec", 2)
        node = child
    node[keys[-1]] = value


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The spec as the coordinator will receive it, after local validation."""
    from ..jobspec import JobSpec  # imports torch (strategy options are checked): only when needed

    p = Path(path)  # "-": standard input, read as YAML
    spec = _parse(p)
    if not isinstance(spec, dict):
        raise AdminError(f"{p}: a job spec is a mapping of fields, got {type(spec).__name__}", 2)
    for assignment in overrides:
        apply_override(spec, assignment)
    try:
        JobSpec.model_validate(spec)
    except ValidationError as e:
        errors = "; ".join(field_error(err) for err in e.errors(include_url=False))
        raise AdminError(f"{p}: invalid job spec: {errors}", 2) from None
    except ValueError as e:  # raised outside pydantic's wrapping (e.g. by a strategy constructor)
        raise AdminError(f"{p}: invalid job spec: {e}", 2) from None
    return spec
