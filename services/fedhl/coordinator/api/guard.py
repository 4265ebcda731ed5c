"""The admin API's outer edge, a pure ASGI middleware that runs before FastAPI reads anything:

- the admin bearer token is checked on /api/v1 and /metrics before one byte of the body is
  received (an unauthenticated upload costs the server its headers only);
- request bodies are capped (413): at once from Content-Length, else while they stream in;
- an unexpected exception becomes a 500 carrying only an error id, logged with its traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from ..errors import new_error_id

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES = ("/api/v1/", "/metrics")


def is_protected(path: str) -> bool:
    return path == "/api/v1" or path.startswith(PROTECTED_PREFIXES)


def bearer_token(scope: Scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    def __init__(self, app: ASGIApp, admin_token: str, max_body_bytes: int) -> None:
        self.app = app
        self.token = admin_token.encode()
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if is_protected(scope["path"]):
            given = bearer_token(scope)
            # compare_digest even for an empty token: the timing does not tell the cases apart
            if not hmac.compare_digest(given, self.token) or not given:
                await send_json(
                    send, 401, {"detail": "missing or invalid admin token"}, ((b"www-authenticate", b"Bearer"),)
                )
                return
        declared = self._content_length(scope)
        if declared is not None and declared > self.max_body:
            await send_json(send, 413, {"detail": f"request body over {self.max_body} bytes"})
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body over {self.max_body} bytes")
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except Exception:
            error_id = new_error_id()
            log.exception("unexpected error %s in %s %s", error_id, scope.get("method"), scope.get("path"))
            if not started:
                await send_json(send, 500, {"detail": "internal error", "error_id": error_id})

    @staticmethod
    def _content_length(scope: Scope) -> int | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None
