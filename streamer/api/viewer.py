"""The browser viewer's routes: its page and files (streamer/viewer/) at `/`, sign-in, and codes.

A browser must never be handed the API token (it would end up in URLs, history and logs), so it
signs in with a one-time code instead: the agent prints `http://HOST:PORT/login?code=C` at start
(`viewer_url`), and `POST /api/v1/viewer/codes` (token required; `microseg viewer-url`) mints
another. Opening the link (`GET /login`) trades the code (single use, expiring) for an HttpOnly,
SameSite=Strict session cookie, which the API accepts on reads only (GET/HEAD: the pages, the
feed, stats), never on writes (streamer/api/auth.py). The codes and sessions are kept by
streamer/api/signin.py. The debug log names only a request's path, never its query, and no
access log is kept, so neither codes nor cookies reach a log.

In: requests. Out: HTML pages and the viewer's files with a strict Content-Security-Policy; a
browser that is not signed in gets a sign-in help page (401), not JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from streamer.api.auth import authenticate
from streamer.api.context import API_PREFIX, CTX, ApiContext, ApiError, json_response
from streamer.api.listen import parse_listen
from streamer.api.params import query_params
from streamer.api.signin import cookie_name

__all__ = [
    "LOGIN_PATH",
    "VIEWER_ASSETS",
    "VIEWER_CODES_PATH",
    "VIEWER_FILES",
    "VIEWER_PAGE_PATHS",
    "viewer_asset",
    "viewer_codes",
    "viewer_index",
    "viewer_login",
    "viewer_url",
]

LOGIN_PATH: Final = "/login"
VIEWER_CODES_PATH: Final = f"{API_PREFIX}/viewer/codes"
VIEWER_ASSETS: Final[dict[str, str]] = {"app.js": "text/javascript", "style.css": "text/css"}
# These check their own authentication (and answer a browser with a page, not JSON).
VIEWER_PAGE_PATHS: Final = frozenset({"/", LOGIN_PATH, *(f"/viewer/{n}" for n in VIEWER_ASSETS)})
_CODE_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_VIEWER_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# The viewer's files, read once on first use; make_app sets an empty dict.
VIEWER_FILES: Final = web.AppKey("microseg_viewer_files", dict)


def _html(status: int, title: str, body: str) -> web.Response:
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<link rel="icon" href="data:,"><title>{title}</title></head><body>{body}</body></html>'
    )
    return web.Response(
        text=page, status=status, content_type="text/html", headers=dict(_VIEWER_HEADERS)
    )


_SIGN_IN_HELP: Final = (
    "<p>Open the one-time sign-in link the agent printed when it started, or make a new one "
    "on the agent's machine with <code>microseg viewer-url</code> (it reads the API token from "
    "the state dir, like the other <code>microseg</code> clients).</p>"
)


def _sign_in_page(reason: str) -> web.Response:
    return _html(
        401, "microseg: sign in", f"<h1>microseg flows: sign in</h1><p>{reason}</p>" + _SIGN_IN_HELP
    )


def _viewer_file(request: web.Request, name: str) -> bytes:
    files: dict[str, bytes] = request.app[VIEWER_FILES]
    if name not in files:
        from importlib.resources import files as resource_files

        files[name] = (resource_files("streamer") / "viewer" / name).read_bytes()
    return files[name]


async def viewer_index(request: web.Request) -> web.Response:
    """GET /: the viewer page for a signed-in browser (or a token); else the sign-in help."""
    try:
        authenticate(request, request.app[CTX])
    except ApiError:
        return _sign_in_page("This browser is not signed in to this agent.")
    return web.Response(
        body=_viewer_file(request, "index.html"),
        content_type="text/html",
        charset="utf-8",
        headers=dict(_VIEWER_HEADERS),
    )


def viewer_asset(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of GET /viewer/`name`, one of `VIEWER_ASSETS`."""

    async def handler(request: web.Request) -> web.Response:
        query_params(request)
        authenticate(request, request.app[CTX])
        return web.Response(
            body=_viewer_file(request, name),
            content_type=VIEWER_ASSETS[name],
            charset="utf-8",
            headers=dict(_VIEWER_HEADERS),
        )

    return handler


async def viewer_login(request: web.Request) -> web.Response:
    """GET /login?code=C: trade a one-time code for a session cookie, then go to `/`."""
    code = query_params(request, ("code",)).get("code", "")
    ctx = request.app[CTX]
    sid: str | None = None
    if ctx.token is not None:
        if 0 < len(code) <= 128 and set(code) <= _CODE_CHARS:
            sid = ctx.viewer.redeem(code)
        if sid is None:
            return _sign_in_page(
                "This sign-in link is not valid: it was used already, it expired, or it is "
                "mistyped."
            )
    # A page that moves on by itself rather than a 302: the navigation to `/` then starts on
    # this site, so the browser sends the SameSite=Strict cookie with it.
    response = _html(
        200,
        "microseg: signed in",
        '<meta http-equiv="refresh" content="0;url=/"><p>Signed in. '
        '<a href="/">Open the flow viewer</a>.</p>',
    )
    if sid is not None:
        response.set_cookie(
            cookie_name(request),
            sid,
            max_age=int(ctx.viewer.session_ttl),
            path="/",
            httponly=True,
            samesite="Strict",
        )
    return response


async def viewer_codes(request: web.Request) -> web.Response:
    """POST /api/v1/viewer/codes: a new one-time sign-in link (path and query) for a browser."""
    query_params(request)
    viewer = request.app[CTX].viewer
    return json_response(
        {
            "path": f"{LOGIN_PATH}?code={viewer.mint()}",
            "expires_in_seconds": int(viewer.code_ttl),
        },
        201,
        {"Cache-Control": "no-store"},
    )


def viewer_url(ctx: ApiContext, listen: str) -> str:
    """The URL a person opens to see the viewer of the API on `listen` (HOST:PORT): a fresh
    one-time sign-in link, or just `/` without auth. A wildcard host becomes loopback."""
    address = parse_listen(listen)
    host = address.host or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    base = f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"
    if ctx.token is None:
        return f"{base}/"
    return f"{base}{LOGIN_PATH}?code={ctx.viewer.mint()}"
