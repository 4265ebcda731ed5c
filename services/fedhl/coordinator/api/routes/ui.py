"""The web view (`/ui`): jobs, a job's rounds with charts, the fleet. Read-only.

Pages are one static shell plus `ui/app.js`, which reads the data as JSON and draws the
tables and SVG charts in the browser (no chart library, nothing fetched from elsewhere).

Authentication is the admin token, entered once on `/ui/login`, which answers with a session
cookie (HttpOnly, SameSite=Strict, Path=/ui; Secure behind TLS) holding an expiry and an
HMAC of it keyed by the admin token: nothing to store server-side, valid on every replica,
void once the token is rotated. Pages without a valid session redirect to the login form;
the JSON under `/ui/api` answers 401. That JSON is the admin API's own GET routes mounted a
second time behind the cookie (same handlers, same schemas), so the page never holds the
token and no state-changing route is reachable with a cookie. Only the login form and the
static script and stylesheet (no data in either) are served without a session.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute

from ..deps import CoordinatorDep
from . import agents, jobs, rounds

ASSETS = Path(__file__).resolve().parent.parent / "ui"
COOKIE = "fedhl_ui"
SESSION_S = 8 * 3600
MAX_FORM_BYTES = 4096
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PAGES = {"jobs": "Jobs", "job": "Job", "fleet": "Fleet"}


def _sign(token: str, expires: int) -> str:
    return hmac.new(token.encode(), f"fedhl-ui-session:{expires}".encode(), hashlib.sha256).hexdigest()


def session_value(token: str, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + SESSION_S)
    return f"{expires}.{_sign(token, expires)}"


def session_valid(value: str | None, token: str, now: float | None = None) -> bool:
    expires, _, sig = (value or "").partition(".")
    if not expires.isdigit() or int(expires) <= (time.time() if now is None else now):
        return False
    return hmac.compare_digest(sig.encode(), _sign(token, int(expires)).encode())


def _has_session(request: Request, coordinator: CoordinatorDep) -> bool:
    return session_valid(request.cookies.get(COOKIE), coordinator.settings.admin_token)


SessionOk = Annotated[bool, Depends(_has_session)]


def require_session_json(ok: SessionOk) -> None:
    if not ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "log in at /ui/login", headers=SECURITY_HEADERS)


def require_session_page(request: Request, ok: SessionOk) -> None:
    if not ok:
        target = quote(request.url.path, safe="/")
        raise HTTPException(status.HTTP_303_SEE_OTHER, headers={"Location": f"/ui/login?next={target}"})


router = APIRouter(prefix="/ui", include_in_schema=False)
PAGE = [Depends(require_session_page)]
data = APIRouter(prefix="/api", dependencies=[Depends(require_session_json)])

# The admin API's read routes (jobs, rounds, agents), unchanged, behind the session cookie.
for _resource in (jobs, rounds, agents):
    for _route in _resource.router.routes:
        if isinstance(_route, APIRoute) and _route.methods == {"GET"}:
            data.add_api_route(_route.path, _route.endpoint, methods=["GET"], response_model=_route.response_model)


def _shell(page: str, title: str) -> HTMLResponse:
    html = (ASSETS / "shell.html").read_text().replace("{{page}}", page).replace("{{title}}", title)
    return HTMLResponse(html, headers=SECURITY_HEADERS)


@router.get("", dependencies=PAGE)
def jobs_page() -> HTMLResponse:
    return _shell("jobs", PAGES["jobs"])


@router.get("/jobs/{job_id}", dependencies=PAGE)
def job_page(job_id: str) -> HTMLResponse:
    return _shell("job", PAGES["job"])  # the script reads the id from the path


@router.get("/fleet", dependencies=PAGE)
def fleet_page() -> HTMLResponse:
    return _shell("fleet", PAGES["fleet"])


def _login_form(error: str = "", code: int = status.HTTP_200_OK) -> HTMLResponse:
    html = (ASSETS / "login.html").read_text().replace("{{error}}", error)
    return HTMLResponse(html, status_code=code, headers=SECURITY_HEADERS)


@router.get("/login")
def login_form() -> HTMLResponse:
    return _login_form()


def _safe_next(raw: str) -> str:
    """Only a path under /ui: never an open redirect to another site."""
    return raw if raw.startswith("/ui") and "//" not in raw and "\\" not in raw else "/ui"


@router.post("/login")
async def login(request: Request, coordinator: CoordinatorDep) -> Response:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return _login_form("Request too large.", status.HTTP_413_CONTENT_TOO_LARGE)
    form = parse_qs(body.decode("utf-8", "replace"))
    given = (form.get("token") or [""])[0].strip().encode()
    expected = coordinator.settings.admin_token.encode()
    if not hmac.compare_digest(given, expected):
        return _login_form("That is not the admin token.", status.HTTP_401_UNAUTHORIZED)
    next_page = _safe_next(request.query_params.get("next", "/ui"))
    response = RedirectResponse(next_page, status_code=status.HTTP_303_SEE_OTHER, headers=SECURITY_HEADERS)
    response.set_cookie(
        COOKIE,
        session_value(coordinator.settings.admin_token),
        max_age=SESSION_S,
        path="/ui",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=status.HTTP_303_SEE_OTHER, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


STATIC = {"app.js": "text/javascript", "style.css": "text/css"}


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    """The script and the stylesheet: code, no data, so the login page can use them too."""
    if name not in STATIC:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file")
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    return FileResponse(ASSETS / name, media_type=STATIC[name], headers=headers)


router.include_router(data)
