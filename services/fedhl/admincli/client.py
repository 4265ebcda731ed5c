"""Connection to the coordinator's admin REST API: where it is, the token, TLS, and every
failure turned into an `AdminError` whose message an operator can act on (no tracebacks)."""

from __future__ import annotations

import os
import ssl
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

API_PREFIX = "/api/v1"
DEFAULT_URL = "http://localhost:8080"
CONFIG_ENV = "FEDHL_CONFIG"
DEFAULT_CONFIG = Path("~/.config/fedhl/admin.toml")
CONFIG_KEYS = {"url", "token", "token_file", "ca_file", "timeout_s"}


class AdminError(Exception):
    """A failure to report in one line; `exit_code` follows the CLI's convention
    (1: the server refused or failed, 2: bad input or configuration, 3: unreachable)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Connection:
    url: str  # the server root, e.g. https://coordinator:8080 (no /api/v1)
    token: str
    ca_file: str | None = None
    timeout_s: float = 30.0


def _read_config(path: Path, explicit: bool) -> dict[str, Any]:
    if not path.exists():
        if explicit:
            raise AdminError(f"config file {path} does not exist", 2)
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise AdminError(f"config file {path}: {e}", 2) from None
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise AdminError(f"config file {path}: unknown keys {sorted(unknown)} (known: {sorted(CONFIG_KEYS)})", 2)
    if "token" in data and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AdminError(f"config file {path} holds the admin token: make it private (chmod 600 {path})", 2)
    return data


def resolve(
    url: str | None = None,
    ca_file: str | None = None,
    config: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Connection:
    """Flags win over `FEDHL_URL` / `FEDHL_ADMIN_TOKEN` / `FEDHL_CA_FILE`, which win over the
    config file (`--config`, `FEDHL_CONFIG` or ~/.config/fedhl/admin.toml, TOML)."""
    env = os.environ if environ is None else environ
    explicit = config or env.get(CONFIG_ENV)
    cfg = _read_config(Path(explicit or DEFAULT_CONFIG).expanduser(), explicit=bool(explicit))
    token = env.get("FEDHL_ADMIN_TOKEN") or cfg.get("token")
    if not token and cfg.get("token_file"):
        try:
            token = Path(str(cfg["token_file"])).expanduser().read_text().strip()
        except OSError as e:
            raise AdminError(f"token_file: {e}", 2) from None
    if not token:
        raise AdminError("no admin token: set FEDHL_ADMIN_TOKEN or `token`/`token_file` in the config file", 2)
    root = (url or env.get("FEDHL_URL") or cfg.get("url") or DEFAULT_URL).rstrip("/")
    root = root.removesuffix(API_PREFIX)
    if not root.startswith(("http://", "https://")):
        raise AdminError(f"the coordinator URL must start with http:// or https://, got {root!r}", 2)
    ca = ca_file or env.get("FEDHL_CA_FILE") or cfg.get("ca_file")
    if ca is not None and not Path(ca).expanduser().is_file():
        raise AdminError(f"CA file {ca} does not exist", 2)
    try:
        timeout = float(cfg.get("timeout_s", 30.0))
    except (TypeError, ValueError):
        raise AdminError(f"timeout_s must be a number, got {cfg.get('timeout_s')!r}", 2) from None
    return Connection(root, str(token), str(Path(ca).expanduser()) if ca else None, timeout)


def _detail(response: httpx.Response) -> str:
    """The server's reason: FastAPI's `detail` (a string, or a list of field errors)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        return "; ".join(field_error(e) for e in detail if isinstance(e, dict))
    return str(detail)


def field_error(err: Mapping[str, Any]) -> str:
    """One pydantic/FastAPI validation error as `field.path: message` (the `body` prefix of a
    request-body location is dropped: the operator wrote the spec, not the request)."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    msg = str(err.get("msg", "invalid"))
    return f"{'.'.join(loc)}: {msg}" if loc else msg


class AdminClient:
    """httpx over the admin API; every method returns decoded JSON or raises `AdminError`.
    The connection is resolved on the first request, so commands that end up sending
    nothing (`jobs submit --dry-run`) need no token."""

    def __init__(self, connect: Connection | Callable[[], Connection]) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        self._client: httpx.Client | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = self._connect if isinstance(self._connect, Connection) else self._connect()
        return self._conn

    @property
    def _http(self) -> httpx.Client:
        if self._client is None:
            conn = self.conn
            self._client = httpx.Client(
                base_url=conn.url + API_PREFIX,
                headers={"Authorization": f"Bearer {conn.token}"},
                timeout=conn.timeout_s,
                verify=ssl.create_default_context(cafile=conn.ca_file) if conn.ca_file else True,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        code = response.status_code
        if code < 400:
            return response
        what = f"{response.request.method} {response.request.url.path}"
        detail = _detail(response)
        if code == 401:
            raise AdminError(f"401 unauthorised: the coordinator refused the admin token ({detail})")
        if code == 404:
            raise AdminError(f"404 not found: {detail}")
        if code == 409:
            raise AdminError(f"409 conflict: {detail}")
        if code == 422:
            raise AdminError(f"422 invalid request: {detail}")
        if code >= 500:
            raise AdminError(f"{code} server error on {what}: {detail} (see the coordinator's log)")
        raise AdminError(f"{code} on {what}: {detail}")

    @contextmanager
    def _transport(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as e:
            raise AdminError(f"cannot reach the coordinator at {self.conn.url}: {_reason(e)}", 3) from None
        except httpx.TimeoutException:
            raise AdminError(
                f"the coordinator at {self.conn.url} did not answer within {self.conn.timeout_s:g} s", 3
            ) from None
        except httpx.HTTPError as e:
            raise AdminError(f"request to {self.conn.url} failed: {_reason(e)}", 3) from None

    def request(self, method: str, path: str, **kw: Any) -> Any:
        with self._transport():
            response = self._check(self._http.request(method, path, **kw))
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def download(self, path: str, dest: Path) -> int:
        """Stream a binary response into `dest`; returns the bytes written."""
        written = 0
        with self._transport(), self._http.stream("GET", path) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            with dest.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        return written


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"TLS certificate not trusted ({text}); pass the coordinator's CA with --ca-file"
    return text
