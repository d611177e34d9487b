"""The checks every request passes before its handler: Host, Origin, and who is asking.

In: a request and the `ApiContext`. Out: nothing, or an `ApiError`: 421 for a `Host` that names
neither an address the API is bound to nor localhost (DNS rebinding), 403 for a write from
another `Origin` (a cross-site request), 401 for a missing or wrong bearer token. `authenticate`
returns the actor a change is recorded under: "token", "viewer" (a browser's session cookie, on
reads only), "unix-socket" (the socket file's mode decides who may connect) or "no-auth".
Unix-socket requests skip the Host check: no browser reaches them.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import Final

from aiohttp import web

from streamer.api.context import API_PREFIX, FLOWS_PATH, ApiContext, ApiError, short
from streamer.api.signin import cookie_name
from streamer.api.tokens import TOKEN_FILE

__all__ = [
    "LOCAL_HOSTS",
    "PUBLIC_PATHS",
    "authenticate",
    "check_host",
    "check_origin",
    "is_ip",
]

LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# Answered without a token.
PUBLIC_PATHS: Final = frozenset({f"{API_PREFIX}/health", "/metrics"})


def _is_unix(request: web.BaseRequest) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def _host_name(header: str) -> str | None:
    """The host part of a Host header, lowercased, without brackets or port; None if bad."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
    else:
        host = text  # a name, an IPv4 address, or (not standard) a bare IPv6 address
    return host.rstrip(".")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_host(request: web.BaseRequest, ctx: ApiContext) -> None:
    header = request.headers.get("Host")
    if header is None or _is_unix(request):
        return  # no browser sends a request without Host or over a Unix socket
    host = _host_name(header)
    if host is not None:
        bound = {h.strip("[]").lower() for h in ctx.bind_hosts}
        if host in LOCAL_HOSTS or host in bound:
            return
        # Bound to every address: an IP literal cannot be rebound, a DNS name can.
        if bound & _WILDCARDS and (is_ip(host) or host == socket.gethostname().lower()):
            return
    raise ApiError(
        421,
        f"this API does not answer to Host {short(header)!r}: use the address it is bound to "
        "or localhost",
    )


def check_origin(request: web.BaseRequest) -> None:
    if request.method in _SAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    if origin is None:
        return
    own = f"{request.scheme}://{request.headers.get('Host', '')}".lower()
    if own.endswith(":80") and own.startswith("http://"):
        own = own[:-3]
    given = origin.strip().lower().rstrip("/")
    if given.endswith(":80") and given.startswith("http://"):
        given = given[:-3]
    if given != own:
        raise ApiError(
            403,
            f"cross-site write refused: Origin {short(origin)!r} is not this API's own origin",
        )


def authenticate(request: web.BaseRequest, ctx: ApiContext) -> str:
    """The actor of the request: "token", "unix-socket" or "no-auth"; else 401."""
    if _is_unix(request):
        return "unix-socket"
    if ctx.token is None:
        return "no-auth"
    header = request.headers.get("Authorization")
    if header is None and request.path == FLOWS_PATH and "token" in request.query:
        # Browsers cannot set headers on a WebSocket handshake: the feed takes ?token=.
        given_q = request.query.getone("token")
        if hmac.compare_digest(given_q.encode("utf-8", "surrogateescape"), ctx.token.encode()):
            return "token"
        raise ApiError(
            401,
            f"wrong token in ?token=: use the token in <state-dir>/{TOKEN_FILE}",
            headers={"WWW-Authenticate": 'Bearer realm="microseg", error="invalid_token"'},
        )
    if header is None and _viewer_cookie_ok(request, ctx):
        return "viewer"
    if header is None:
        raise ApiError(
            401,
            "missing token: send the header 'Authorization: Bearer <token>'; the token is in "
            f"<state-dir>/{TOKEN_FILE}",
            headers={"WWW-Authenticate": 'Bearer realm="microseg"'},
        )
    scheme, _, given = header.strip().partition(" ")
    expected = ctx.token.encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected
    ):
        raise ApiError(
            401,
            f"wrong token: use 'Authorization: Bearer <token>' with the token in "
            f"<state-dir>/{TOKEN_FILE}",
            headers={"WWW-Authenticate": 'Bearer realm="microseg", error="invalid_token"'},
        )
    return "token"


def _viewer_cookie_ok(request: web.BaseRequest, ctx: ApiContext) -> bool:
    """A read (GET/HEAD) carrying a live viewer session cookie."""
    return request.method in ("GET", "HEAD") and ctx.viewer.session_ok(
        request.cookies.get(cookie_name(request))
    )
