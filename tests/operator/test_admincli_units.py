"""Unit tests of the pieces with no server behind them: connection resolution, `--set`
overrides, the web view's session values and redirect guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedhl.admincli.client import AdminError, resolve
from fedhl.admincli.specfile import apply_override
from fedhl.coordinator.api.routes.ui import SESSION_S, _safe_next, session_valid, session_value

REPO = Path(__file__).resolve().parents[2]


def test_flags_win_over_the_environment_which_wins_over_the_config_file(tmp_path: Path) -> None:
    # Prepare
    config = tmp_path / "admin.toml"
    config.write_text('url = "https://from-config:8443"\ntoken = "config-token"\n')
    config.chmod(0o600)
    env = {"FEDHL_CONFIG": str(config)}
    # Execute / Assert
    assert resolve(environ=env).url == "https://from-config:8443"
    assert resolve(environ=env).token == "config-token"
    env |= {"FEDHL_URL": "http://from-env:8080/api/v1/", "FEDHL_ADMIN_TOKEN": "env-token"}
    assert resolve(environ=env).url == "http://from-env:8080"  # /api/v1 and the slash dropped
    assert resolve(environ=env).token == "env-token"
    assert resolve(url="http://from-flag:1", environ=env).url == "http://from-flag:1"


def test_token_file_and_bad_values(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("file-token\n")
    config = tmp_path / "admin.toml"
    config.write_text(f'token_file = "{secret}"\n')
    assert resolve(environ={"FEDHL_CONFIG": str(config)}).token == "file-token"
    with pytest.raises(AdminError, match="must start with http:// or https://"):
        resolve(url="coordinator:8080", environ={"FEDHL_ADMIN_TOKEN": "t"})
    with pytest.raises(AdminError, match=r"config file .* does not exist"):
        resolve(config=str(tmp_path / "missing.toml"), environ={"FEDHL_ADMIN_TOKEN": "t"})
    config.write_text("url = [")
    with pytest.raises(AdminError, match="config file"):
        resolve(environ={"FEDHL_CONFIG": str(config), "FEDHL_ADMIN_TOKEN": "t"})


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("rounds=3", {"rounds": 3, "selection": {"count": 2}}),
        ("selection.min_clients=4", {"rounds": 1, "selection": {"count": 2, "min_clients": 4}}),
        ("rank_set=[2, 4]", {"rounds": 1, "selection": {"count": 2}, "rank_set": [2, 4]}),
        ("evaluation.path=null", {"rounds": 1, "selection": {"count": 2}, "evaluation": {"path": None}}),
        ("name=a=b", {"rounds": 1, "selection": {"count": 2}, "name": "a=b"}),
    ],
)
def test_set_overrides_keep_yaml_types(assignment: str, expected: dict[str, object]) -> None:
    spec: dict[str, object] = {"rounds": 1, "selection": {"count": 2}}
    apply_override(spec, assignment)
    assert spec == expected


@pytest.mark.parametrize("assignment", ["rounds", "=3", "selection..count=1", "rounds.x=1"])
def test_bad_overrides_are_refused(assignment: str) -> None:
    with pytest.raises(AdminError):
        apply_override({"rounds": 1}, assignment)


def test_a_spec_from_standard_input() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedhl.cli", "jobs", "submit", "-", "--dry-run", "--set", "rounds=2"],
        input=(REPO / "deploy" / "examples" / "reviews.yaml").read_text(),
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")},  # no token needed
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "-: valid job spec 'reviews'"


def test_session_values_expire_and_are_bound_to_the_token() -> None:
    now = 1_800_000_000.0
    value = session_value("admin-token-0123456789", now)
    assert session_valid(value, "admin-token-0123456789", now + SESSION_S - 1)
    assert not session_valid(value, "admin-token-0123456789", now + SESSION_S)  # expired
    assert not session_valid(value, "rotated-token-0123456789", now)  # the token changed
    expires, _, sig = value.partition(".")
    assert not session_valid(f"{int(expires) + 3600}.{sig}", "admin-token-0123456789", now)  # extended by hand
    for garbage in (None, "", ".", "abc.def", f"{expires}.", "-1.00"):
        assert not session_valid(garbage, "admin-token-0123456789", now)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/ui/jobs/abc", "/ui/jobs/abc"),
        ("/ui/fleet", "/ui/fleet"),
        ("//evil.example/ui", "/ui"),
        ("https://evil.example/ui", "/ui"),
        ("/ui//evil.example", "/ui"),
        ("/ui\\\\evil.example", "/ui"),
        ("/api/v1/jobs", "/ui"),
    ],
)
def test_login_redirects_only_within_the_web_view(given: str, expected: str) -> None:
    assert _safe_next(given) == expected
