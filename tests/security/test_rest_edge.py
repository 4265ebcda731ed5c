"""The REST edge against a real uvicorn process over raw sockets: an unauthenticated request is
refused before its body is read, over-size bodies get 413 without being read in full, path
integers never reach the database unbounded, and lists are paginated."""

from __future__ import annotations

import select
import socket
import time

from live_stack import Live

MiB = 1 << 20


def _request(live: Live, head: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", live.http_port), timeout=10)
    s.sendall(head.encode())
    return s


def _status(s: socket.socket) -> int:
    data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    return int(data.split(b" ")[1])


def test_unauthenticated_50mib_post_gets_401_before_one_body_byte_is_sent(live: Live) -> None:
    # Only the headers go out: a server that read (or waited for) the body could not answer.
    for path in ("/api/v1/jobs", "/api/v1/agents/enrolment-tokens", "/metrics"):
        s = _request(
            live,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {50 * MiB}\r\n\r\n",
        )
        with s:
            assert _status(s) == 401


def test_unauthenticated_chunked_upload_is_refused_without_reading_it(live: Live) -> None:
    s = _request(live, "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    with s:
        assert _status(s) == 401


def test_declared_oversize_body_gets_413_at_once(live: Live) -> None:
    token = live.http.headers["Authorization"]
    s = _request(
        live,
        f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {50 * MiB}\r\n\r\n",
    )
    with s:
        assert _status(s) == 413


def test_streamed_oversize_body_is_cut_off_near_the_limit(live: Live) -> None:
    """No Content-Length: the server counts while reading and answers 413 once past 1 MiB; the
    client gets its answer long before it could push 50 MiB (socket buffers hold a few MiB)."""
    token = live.http.headers["Authorization"]
    s = _request(
        live,
        f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
    sent, deadline = 0, time.monotonic() + 60
    with s:
        while sent < 50 * MiB and time.monotonic() < deadline:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except OSError:  # the server answered and closed
                break
            sent += 64 * 1024
        assert _status(s) == 413
    assert sent < 16 * MiB, f"the client pushed {sent} bytes before the 413"


def test_huge_path_integers_are_422_never_500(live: Live) -> None:
    job = live.job_id
    for path in (
        f"/jobs/{job}/rounds/99999999999999999999",
        f"/jobs/{job}/rounds/-1",
        f"/jobs/{job}/checkpoints/99999999999999999999/state",
        f"/jobs/{'x' * 1000}",
    ):
        assert live.http.get(path).status_code == 422, path
    assert live.http.get(f"/jobs/{job}/rounds/9223372036854775807").status_code == 404


def test_lists_are_paginated_with_a_bounded_limit(live: Live) -> None:
    for i in range(3):
        live.http.post("/agents/enrolment-tokens", json={"label": f"page-{i}"}).raise_for_status()
    seen: list[str] = []
    cursor: str | None = None
    while True:
        r = live.http.get("/agents/enrolment-tokens", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        r.raise_for_status()
        assert len(r.json()) <= 2
        seen += [t["id"] for t in r.json()]
        cursor = r.headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) >= 4  # every token once
    for path in ("/jobs", "/agents", "/agents/enrolment-tokens", "/audit", f"/jobs/{live.job_id}/rounds"):
        assert live.http.get(path, params={"limit": 100_000}).status_code == 422, path
        assert live.http.get(path, params={"cursor": "not-a-cursor"}).status_code == 422, path
    audit = live.http.get("/audit", params={"limit": 1})
    older = live.http.get("/audit", params={"limit": 1, "cursor": audit.headers["X-Next-Cursor"]}).json()
    assert older[0]["id"] < audit.json()[0]["id"]
