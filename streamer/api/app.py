"""The admin API (SPEC §3): aiohttp routes under /api/v1, plus /metrics.

In: HTTP requests on TCP (`HOST:PORT`) or Unix sockets (`unix:/path`). Out: JSON bodies; every
error is `{"error": code, "message": text}` (never a stack trace; the traceback of an unexpected
failure goes only to the log). Policy writes go through the `PolicyStore` and are answered only
once the change is enforced in the kernel and saved.

Checks, in order, before any handler runs:
1. 421 when `Host` names neither an address the API is bound to nor localhost (DNS rebinding);
   Unix-socket requests are exempt (no browser reaches them).
2. 403 when a write (any method but GET/HEAD/OPTIONS) carries an `Origin` other than the API's
   own (`http://<Host>`): a cross-site request.
3. 401 when the bearer token is missing or wrong (constant-time compare), except on
   `/api/v1/health` and `/metrics`, with `--no-auth` (token None), and on Unix sockets, where
   the socket file's mode (0660) decides who may connect.
Then the route: unknown → 404, wrong method → 405 (with `Allow`), unknown query parameter → 400
(a typo like `?dryrun=1` must not apply a change), body not `application/json` → 415, too large
→ 413 (64 KiB; 64 MiB for `PUT /api/v1/policies`), bad JSON or invalid rule → 400.

No CORS headers are ever sent: browsers on other origins cannot read answers.
`DELETE /api/v1/policies/{rule_id}` answers 200 with the deleted rule. Writes carry the new
policy generation in the `X-Policy-Generation` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import pydantic
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from streamer.api.metrics import (
    ApiMetrics,
    MicrosegCollector,
    api_metrics,
    read_stats,
    register_collector,
)
from streamer.api.openapi import RULE_LIMIT_MAX, SESSION_LIMIT_MAX, build_openapi
from streamer.events.decode import PROTOCOLS, TCP_FLAG_NAMES
from streamer.policy.model import (
    MAX_RULE_ID,
    PolicyError,
    PolicySet,
    Rule,
    format_validation_error,
    parse_policy_document,
)
from streamer.policy.store import ChangeResult, PolicyStore, StoreError

__all__ = [
    "API_PREFIX",
    "SMALL_BODY_LIMIT",
    "TOKEN_FILE",
    "WHOLE_SET_BODY_LIMIT",
    "ApiContext",
    "ApiSetupError",
    "ListenAddress",
    "ViewerAuth",
    "add_viewer_routes",
    "host_of",
    "load_or_create_token",
    "make_app",
    "parse_listen",
    "start_api",
    "viewer_url",
]

log = logging.getLogger("microseg.api")

API_PREFIX: Final = "/api/v1"
FLOWS_PATH: Final = f"{API_PREFIX}/flows"
TOKEN_FILE: Final = "api-token"
SMALL_BODY_LIMIT: Final = 64 * 1024
WHOLE_SET_BODY_LIMIT: Final = 64 * 1024 * 1024  # 100,000 full rules take about 20 MiB
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"})
_PUBLIC_PATHS: Final = frozenset({f"{API_PREFIX}/health", "/metrics"})
_BIG_JSON: Final = 256 * 1024  # parse and validate bodies above this off the event loop
_MAX_LISTED_ERRORS: Final = 100
_STATUS_CODES: Final[dict[int, str]] = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
    500: "internal",
    503: "unavailable",
}


class ApiSetupError(RuntimeError):
    """The API cannot start (token file, listen address); the message is for the operator."""


@dataclass
class ApiContext:
    """What the API serves from. `token` None means --no-auth.

    `bind_hosts`: host names/addresses the API is reachable by (`start_api` adds the listen
    hosts); localhost, 127.0.0.1 and ::1 are always accepted in `Host`.
    `extra_stats`: more counters for /stats and /metrics (the event pipeline's).
    `reload(actor)`: re-apply the agent's policy file as a whole-set replace (`POST
    /api/v1/policies/reload`, `microseg policy load`); None: that route answers 404.
    `flows`: the live flow feed (a `streamer.events.sinks.websocket.WebSocketHub`) behind
    `GET /api/v1/flows`; None: that route answers 503.
    """

    store: PolicyStore
    datapath: Any
    interfaces: list[str]
    version: str
    started_monotonic: float
    token: str | None
    bind_hosts: set[str]
    registry: CollectorRegistry
    extra_stats: Callable[[], dict[str, Any]] | None = None
    reload: Callable[[str], Awaitable[ChangeResult]] | None = None
    flows: Any = None
    # The browser viewer's one-time sign-in codes and sessions (see "the viewer" below).
    viewer: ViewerAuth = field(default_factory=lambda: ViewerAuth(), repr=False)


CTX: Final = web.AppKey("microseg_ctx", ApiContext)
METRICS: Final = web.AppKey("microseg_metrics", ApiMetrics)
OPENAPI: Final = web.AppKey("microseg_openapi", bytes)
ACTOR: Final = web.RequestKey("microseg_actor", str)


class ApiError(Exception):
    """An answer other than success; becomes `{"error": code, "message": message}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        errors: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _STATUS_CODES.get(status, f"http_{status}")
        self.message = message
        self.errors = errors
        self.headers = headers


# ---- responses ---------------------------------------------------------------------------


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


def _error(
    status: int,
    code: str,
    message: str,
    errors: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"error": code, "message": message}
    if errors is not None and len(errors) > 1:
        body["errors"] = errors[:_MAX_LISTED_ERRORS]
    return _json(body, status, headers)


def _problems(errors: list[str]) -> ApiError:
    """A 400 listing validation problems: all in `errors`, the first ones in the message."""
    shown = errors[:20]
    message = "\n".join(shown)
    if len(errors) > len(shown):
        message += f"\n... and {len(errors) - len(shown)} more problems"
    return ApiError(400, message, errors=errors)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wall_time(monotonic_ns: int) -> str | None:
    """A CLOCK_MONOTONIC stamp as RFC 3339 UTC (millisecond precision: the kernel's clock is
    coarse); None for 0 (never)."""
    if monotonic_ns <= 0:
        return None
    wall = time.time() - (time.monotonic() - monotonic_ns / 1e9)
    return (
        datetime.fromtimestamp(wall, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


# ---- request checks -------------------------------------------------------------------------


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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_host(request: web.BaseRequest, ctx: ApiContext) -> None:
    header = request.headers.get("Host")
    if header is None or _is_unix(request):
        return  # no browser sends a request without Host or over a Unix socket
    host = _host_name(header)
    if host is not None:
        bound = {h.strip("[]").lower() for h in ctx.bind_hosts}
        if host in LOCAL_HOSTS or host in bound:
            return
        # Bound to every address: an IP literal cannot be rebound, a DNS name can.
        if bound & _WILDCARDS and (_is_ip(host) or host == socket.gethostname().lower()):
            return
    raise ApiError(
        421,
        f"this API does not answer to Host {_short(header)!r}: use the address it is bound to "
        "or localhost",
    )


def _check_origin(request: web.BaseRequest) -> None:
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
            f"cross-site write refused: Origin {_short(origin)!r} is not this API's own origin",
        )


def _authenticate(request: web.BaseRequest, ctx: ApiContext) -> str:
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


def _route_label(request: web.BaseRequest) -> str:
    match_info = getattr(request, "match_info", None)
    resource = match_info.route.resource if match_info is not None else None
    return resource.canonical if resource is not None else "unmatched"


def _http_exception(exc: web.HTTPException, request: web.BaseRequest) -> web.Response:
    """aiohttp's own errors (unknown route, wrong method, ...) as JSON."""
    status = exc.status
    path = _short(request.path)
    if status == 404:
        message = f"no such route: {request.method} {path} (see {API_PREFIX}/openapi.json)"
    elif status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"{_short(request.method, 20)} is not allowed on {path}; allowed: {allowed}"
    elif status == 413:
        message = "the body is too large"
    else:
        message = exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return _error(status, _STATUS_CODES.get(status, f"http_{status}"), message, headers=headers)


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    ctx = request.app[CTX]
    started = time.perf_counter()
    status = 500
    try:
        response = await _dispatch(request, handler, ctx)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        elapsed = time.perf_counter() - started
        method = request.method if request.method in _KNOWN_METHODS else "other"
        request.app[METRICS].observe(_route_label(request), method, status, elapsed)
        log.debug("%s %s -> %d in %.1f ms", method, _short(request.path), status, elapsed * 1000)


async def _dispatch(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ctx: ApiContext,
) -> web.StreamResponse:
    try:
        _check_host(request, ctx)
        _check_origin(request)
        if request.path not in _PUBLIC_PATHS and request.path not in VIEWER_PAGE_PATHS:
            request[ACTOR] = _authenticate(request, ctx)
        return await handler(request)
    except ApiError as e:
        return _error(e.status, e.code, e.message, e.errors, e.headers)
    except StoreError as e:
        return _error(e.status, e.code, str(e))
    except web.HTTPException as e:
        return _http_exception(e, request)
    except (ConnectionResetError, asyncio.IncompleteReadError) as e:
        log.info("%s %s: the client went away: %s", request.method, request.path, e)
        return _error(400, "invalid", "the request was cut short")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal", "internal error: the agent's log has the details")


# ---- input ------------------------------------------------------------------------------


def _query(request: web.Request, allowed: tuple[str, ...] = ()) -> dict[str, str]:
    """The query parameters, each at most once and all of them known; else 400."""
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            hint = f"allowed: {', '.join(allowed)}" if allowed else "this route takes none"
            raise ApiError(400, f"unknown query parameter {_short(key, 40)!r}: {hint}")
        if key in out:
            raise ApiError(400, f"query parameter {key!r} is given more than once")
        out[key] = value
    return out


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _dry_run(request: web.Request) -> bool:
    value = _query(request, ("dry_run",)).get("dry_run")
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    # A bare `?dry_run` is ambiguous: refuse it rather than guess and maybe apply.
    raise ApiError(400, f"dry_run: {_short(value, 40)!r} is not a flag: use dry_run=1 or dry_run=0")


def _int_param(name: str, value: str, low: int, high: int) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise ApiError(400, f"{name}: {_short(value, 40)!r} is not a whole number {low}..{high}")
    number = int(value)
    if not low <= number <= high:
        raise ApiError(400, f"{name}: {number} is out of range: use {low}..{high}")
    return number


def _path_rule_id(request: web.Request) -> int:
    raw = request.match_info["rule_id"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not (
        1 <= int(raw) <= MAX_RULE_ID
    ):
        raise ApiError(
            400,
            f"rule_id in the path: {_short(raw, 40)!r} is not a valid rule_id: use an int "
            f"1..{MAX_RULE_ID}",
        )
    return int(raw)


async def _read_json(request: web.Request, limit: int) -> Any:
    """The JSON body: 415 unless application/json (UTF-8), 413 above `limit`, 400 if bad."""
    if "Content-Type" not in request.headers or request.content_type != "application/json":
        given = request.headers.get("Content-Type", "none")
        raise ApiError(
            415,
            f"the body must be JSON, sent with 'Content-Type: application/json' "
            f"(got {_short(given, 60)!r})",
        )
    charset = request.charset
    if charset is not None and charset.lower().replace("-", "") != "utf8":
        raise ApiError(
            415,
            f"JSON must be UTF-8 (application/json; charset=utf-8), not {_short(charset, 30)!r}",
        )
    too_large = ApiError(413, f"the body is larger than {limit // 1024} KiB, the limit here")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        raise ApiError(400, "the body is empty: expected a JSON object")
    try:
        if len(body) > _BIG_JSON:
            return await asyncio.to_thread(orjson.loads, body)
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(
            400, f"the body is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}"
        ) from None


def _validate_rule(data: Any) -> Rule:
    try:
        return Rule.model_validate(data)
    except pydantic.ValidationError as e:
        raise _problems(format_validation_error(e, data)) from None


def _validate_set(data: Any) -> PolicySet:
    """A policy document, read as a policy file is (a missing default_action is "allow", a
    missing policies list is empty): the same document means the same set everywhere."""
    try:
        return parse_policy_document(data)
    except PolicyError as e:
        raise _problems(e.errors) from None


async def _write(coro: Awaitable[ChangeResult]) -> ChangeResult:
    """Await a store change; if the request is cancelled, the change still completes (the
    store's lock stays held until the kernel and disk agree)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise


def _generation_header(result: ChangeResult) -> dict[str, str]:
    return {"X-Policy-Generation": str(result.generation)}


# ---- handlers -----------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "message": "API server is healthy"})


async def _stats(ctx: ApiContext) -> dict[str, Any]:
    # A stale session count walks the whole session table: not on the event loop.
    return await asyncio.to_thread(read_stats, ctx.datapath, ctx.extra_stats)


async def status(request: web.Request) -> web.Response:
    _query(request)
    ctx = request.app[CTX]
    stats = await _stats(ctx)
    loaded = bool(getattr(ctx.datapath, "loaded", True))
    try:
        kernel_generation = int(ctx.datapath.active()[0]) if loaded else 0
    except Exception as e:
        log.warning("reading the kernel's policy generation failed: %s", e)
        kernel_generation = 0
    store_generation = ctx.store.generation
    if not loaded:
        dp = {"status": "stopped", "message": "the classifier is not loaded"}
    elif kernel_generation != store_generation:
        dp = {
            "status": "degraded",
            "message": f"the kernel enforces generation {kernel_generation}, the store holds "
            f"{store_generation}",
        }
    else:
        dp = {"status": "running", "message": "Data plane is operational"}
    return _json(
        {
            "status": "ok" if dp["status"] == "running" else "degraded",
            "version": ctx.version,
            "interface": ",".join(ctx.interfaces),
            "interfaces": list(ctx.interfaces),
            "data_plane": {**dp, "generation": kernel_generation},
            "api": {"status": "running", "message": "API server is operational"},
            "statistics": stats,
            "policy_count": len(ctx.store.policy.policies),
            "policy_generation": store_generation,
            "uptime_seconds": max(0, int(time.monotonic() - ctx.started_monotonic)),
        }
    )


def _policy_list(store: PolicyStore) -> bytes:
    policy, generation = store.policy, store.generation
    return orjson.dumps(
        {
            "policies": [r.to_api() for r in policy.policies],
            "count": len(policy.policies),
            "default_action": policy.default_action.value,
            "generation": generation,
        }
    )


async def list_policies(request: web.Request) -> web.Response:
    _query(request)
    store = request.app[CTX].store
    if len(store.policy.policies) > 5000:
        body = await asyncio.to_thread(_policy_list, store)
    else:
        body = _policy_list(store)
    return web.Response(body=body, content_type="application/json")


async def add_policy(request: web.Request) -> web.Response:
    dry_run = _dry_run(request)
    ctx = request.app[CTX]
    rule = _validate_rule(await _read_json(request, SMALL_BODY_LIMIT))
    result = await _write(ctx.store.add(rule, request[ACTOR], dry_run))
    headers = _generation_header(result)
    if dry_run:
        return _json(result.to_api(), 200, headers)
    headers["Location"] = f"{API_PREFIX}/policies/{rule.rule_id}"
    return _json(rule.to_api(), 201, headers)


async def replace_policies(request: web.Request) -> web.Response:
    dry_run = _dry_run(request)
    ctx = request.app[CTX]
    data = await _read_json(request, WHOLE_SET_BODY_LIMIT)
    rules = data.get("policies") if isinstance(data, dict) else None
    if isinstance(rules, list) and len(rules) > 1000:
        policy = await asyncio.to_thread(_validate_set, data)
    else:
        policy = _validate_set(data)
    result = await _write(ctx.store.replace(policy, request[ACTOR], dry_run))
    size = len(result.added) + len(result.removed) + len(result.changed)
    if size > 5000:
        body = await asyncio.to_thread(lambda: orjson.dumps(result.to_api()))
        return web.Response(
            body=body, content_type="application/json", headers=_generation_header(result)
        )
    return _json(result.to_api(), 200, _generation_header(result))


async def reload_policies(request: web.Request) -> web.Response:
    _query(request)
    ctx = request.app[CTX]
    if ctx.reload is None:
        raise ApiError(404, "this agent has no policy file to reload")
    result = await _write(ctx.reload(request[ACTOR]))
    return _json(result.to_api(), 200, _generation_header(result))


async def get_policy(request: web.Request) -> web.Response:
    rule_id = _path_rule_id(request)
    _query(request)
    ctx = request.app[CTX]
    rule = ctx.store.policy.get(rule_id)
    if rule is None:
        raise ApiError(404, f"no rule with rule_id {rule_id}")
    counters = ctx.datapath.rule_counters(rule_id)
    return _json(
        {
            **rule.to_api(),
            "packets": int(counters.packets),
            "bytes": int(counters.bytes),
            "last_hit": _wall_time(int(counters.last_hit_ns)),
        }
    )


async def update_policy(request: web.Request) -> web.Response:
    rule_id = _path_rule_id(request)
    dry_run = _dry_run(request)
    ctx = request.app[CTX]
    data = await _read_json(request, SMALL_BODY_LIMIT)
    if isinstance(data, dict):
        if "rule_id" in data and not (type(data["rule_id"]) is int and data["rule_id"] == rule_id):
            raise ApiError(
                400,
                f"rule_id: the body's rule_id ({_short(orjson.dumps(data['rule_id']).decode())})"
                f" is not the path's ({rule_id}): a rule's id cannot change; delete the rule "
                "and add a new one",
            )
        data = {**data, "rule_id": rule_id}
    rule = _validate_rule(data)
    result = await _write(ctx.store.update(rule, request[ACTOR], dry_run))
    if dry_run:
        return _json(result.to_api(), 200, _generation_header(result))
    return _json(rule.to_api(), 200, _generation_header(result))


async def delete_policy(request: web.Request) -> web.Response:
    rule_id = _path_rule_id(request)
    dry_run = _dry_run(request)
    ctx = request.app[CTX]
    result = await _write(ctx.store.delete(rule_id, request[ACTOR], dry_run))
    if dry_run:
        return _json(result.to_api(), 200, _generation_header(result))
    return _json(result.removed[0].to_api(), 200, _generation_header(result))


async def stats(request: web.Request) -> web.Response:
    _query(request)
    return _json(await _stats(request.app[CTX]))


def _rate(part: int, whole: int) -> float:
    return round(part / whole * 100, 4) if whole else 0.0


async def packet_stats(request: web.Request) -> web.Response:
    _query(request)
    s = await _stats(request.app[CTX])
    total = s["total_packets"]
    return _json(
        {
            "total_packets": total,
            "allowed_packets": s["allowed_packets"],
            "denied_packets": s["denied_packets"],
            "logged_packets": s["logged_packets"],
            "allow_rate": _rate(s["allowed_packets"], total),
            "deny_rate": _rate(s["denied_packets"], total),
            "by_direction": s["by_direction"],
        }
    )


def _hits(counters: Any) -> dict[str, Any]:
    return {
        "packets": int(counters.packets),
        "bytes": int(counters.bytes),
        "last_hit": _wall_time(int(counters.last_hit_ns)),
    }


async def policy_stats(request: web.Request) -> web.Response:
    query = _query(request, ("limit",))
    limit = _int_param("limit", query.get("limit", "100"), 0, RULE_LIMIT_MAX)
    ctx = request.app[CTX]
    s = await _stats(ctx)
    policy = ctx.store.policy
    per_rule, default = await asyncio.to_thread(
        lambda: (ctx.datapath.all_rule_counters(), ctx.datapath.default_counters())
    )
    zero = _Zero()
    ranked = sorted(
        policy.policies,
        key=lambda r: (-per_rule.get(r.rule_id, zero).packets, r.rule_id),
    )[:limit]
    rules = [
        {
            "rule_id": r.rule_id,
            "name": r.name,
            "action": r.action.value,
            **_hits(per_rule.get(r.rule_id, zero)),
        }
        for r in ranked
    ]
    hits, misses = s["policy_hits"], s["policy_misses"]
    return _json(
        {
            "policy_hits": hits,
            "policy_misses": misses,
            "hit_rate": _rate(hits, hits + misses),
            "rule_count": len(policy.policies),
            "default": _hits(default),
            "rules": rules,
        }
    )


@dataclass(frozen=True)
class _Zero:
    packets: int = 0
    bytes: int = 0
    last_hit_ns: int = 0


_SESSION_PARAMS: Final = (
    "ip",
    "src_ip",
    "dst_ip",
    "port",
    "src_port",
    "dst_port",
    "protocol",
    "verdict",
    "limit",
)
_PROTOCOL_FILTER: Final[dict[str, int | None]] = {
    "tcp": 6,
    "udp": 17,
    "icmp": 1,
    "icmpv6": 58,
    "any": None,
}
_VERDICTS: Final = ("allow", "deny", "log")
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _net_param(name: str, value: str) -> IPNet:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ApiError(400, f"{name}: {_short(value, 60)!r} is not an IP address or CIDR") from None


def _in(net: IPNet, address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in net
    except ValueError:
        return False


_ADDRESS_FILTERS: Final = (
    ("ip", ("src_ip", "dst_ip")),
    ("src_ip", ("src_ip",)),
    ("dst_ip", ("dst_ip",)),
)
_PORT_FILTERS: Final = (
    ("port", ("src_port", "dst_port")),
    ("src_port", ("src_port",)),
    ("dst_port", ("dst_port",)),
)


def _address_check(net: IPNet, ends: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda s: any(_in(net, getattr(s, end)) for end in ends)


def _port_check(port: int, ends: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda s: any(getattr(s, end) == port for end in ends)


def _session_filter(query: dict[str, str]) -> Callable[[Any], bool]:
    """A predicate over `Session`s from the /sessions query; 400 on a bad value."""
    checks: list[Callable[[Any], bool]] = []
    for name, ends in _ADDRESS_FILTERS:
        if name in query:
            checks.append(_address_check(_net_param(name, query[name]), ends))
    for name, ends in _PORT_FILTERS:
        if name in query:
            checks.append(_port_check(_int_param(name, query[name], 0, 65535), ends))
    if "protocol" in query:
        name = query["protocol"].lower()
        if name not in _PROTOCOL_FILTER:
            raise ApiError(
                400,
                f"protocol: {_short(query['protocol'], 40)!r} is not one of: "
                + ", ".join(_PROTOCOL_FILTER),
            )
        number = _PROTOCOL_FILTER[name]
        if number is not None:
            checks.append(lambda s: bool(s.protocol == number))
    if "verdict" in query:
        verdict = query["verdict"].lower()
        if verdict not in _VERDICTS:
            raise ApiError(
                400,
                f"verdict: {_short(query['verdict'], 40)!r} is not one of: " + ", ".join(_VERDICTS),
            )
        checks.append(lambda s: bool(s.verdict == verdict))
    return lambda s: all(check(s) for check in checks)


def _session_json(s: Any) -> dict[str, Any]:
    return {
        "src_ip": s.src_ip,
        "dst_ip": s.dst_ip,
        "src_port": s.src_port,
        "dst_port": s.dst_port,
        "protocol": PROTOCOLS.get(s.protocol, str(s.protocol)),
        "family": s.family,
        "direction": s.direction,
        "verdict": s.verdict,
        "rule_id": s.rule_id,
        "policy_generation": s.generation,
        "ifindex": s.ifindex,
        "first_seen": _wall_time(s.first_seen_ns),
        "last_seen": _wall_time(s.last_seen_ns),
        "packets_out": s.packets_out,
        "bytes_out": s.bytes_out,
        "packets_in": s.packets_in,
        "bytes_in": s.bytes_in,
        "tcp_flags": (
            "|".join(n for i, n in enumerate(TCP_FLAG_NAMES) if s.tcp_flags >> i & 1)
            if s.protocol == 6
            else None
        ),
    }


def _find_sessions(
    datapath: Any, keep: Callable[[Any], bool], limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` matching sessions, and whether more matched (one walk of the table)."""
    out: list[dict[str, Any]] = []
    for s in datapath.sessions():
        if keep(s):
            if len(out) == limit:
                return out, True
            out.append(_session_json(s))
    return out, False


async def sessions(request: web.Request) -> web.Response:
    query = _query(request, _SESSION_PARAMS)
    limit = _int_param("limit", query.get("limit", "100"), 1, SESSION_LIMIT_MAX)
    keep = _session_filter(query)
    found, truncated = await asyncio.to_thread(
        _find_sessions, request.app[CTX].datapath, keep, limit
    )
    return _json({"sessions": found, "count": len(found), "truncated": truncated})


_FLOW_PARAMS: Final = ("verdict", "ip", "port", "protocol", "rule_id", "token")


async def flows(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/flows: upgrade to a WebSocket streaming flow events (see
    streamer/events/sinks/websocket.py); filters in the query string."""
    from streamer.events.sinks.websocket import FlowFilter

    query = _query(request, _FLOW_PARAMS)
    try:
        flt = FlowFilter.parse(query)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    origin = request.headers.get("Origin")
    if origin is not None:
        own = f"{request.scheme}://{request.headers.get('Host', '')}".lower().removesuffix(":80")
        if origin.strip().lower().rstrip("/").removesuffix(":80") != own:
            raise ApiError(
                403,
                f"cross-site WebSocket refused: Origin {_short(origin)!r} is not this API's own",
            )
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise ApiError(
            400, "this route is a WebSocket: connect with a WebSocket client (Upgrade: websocket)"
        )
    hub = request.app[CTX].flows
    if hub is None:
        raise ApiError(503, "this agent runs no flow event feed")
    if hub.closed or not hub.has_room():
        raise ApiError(503, "the flow feed takes no more clients right now")
    response: web.StreamResponse = await hub.serve(request, flt)
    return response


async def openapi(request: web.Request) -> web.Response:
    _query(request)
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    # The collector reads kernel maps (and may walk the session table): off the event loop.
    body = await asyncio.to_thread(generate_latest, request.app[CTX].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


# ---- the application ------------------------------------------------------------------------


def make_app(ctx: ApiContext) -> web.Application:
    """The aiohttp application serving `ctx`; registers the metrics on `ctx.registry`."""
    register_collector(
        ctx.registry,
        MicrosegCollector(ctx.datapath, ctx.store, ctx.extra_stats),
    )
    # Handlers enforce their own body limits (64 KiB, or 64 MiB for a whole set).
    app = web.Application(middlewares=[_middleware], client_max_size=WHOLE_SET_BODY_LIMIT)
    app[CTX] = ctx
    app[METRICS] = api_metrics(ctx.registry)
    app[OPENAPI] = orjson.dumps(build_openapi(ctx.version, auth=ctx.token is not None))
    r = app.router
    p = API_PREFIX
    r.add_get(f"{p}/health", health, allow_head=False)
    r.add_get(f"{p}/status", status, allow_head=False)
    r.add_get(f"{p}/policies", list_policies, allow_head=False)
    r.add_post(f"{p}/policies", add_policy)
    r.add_put(f"{p}/policies", replace_policies)
    # Before {rule_id}: "reload" is no rule_id.
    r.add_post(f"{p}/policies/reload", reload_policies)
    r.add_get(f"{p}/policies/{{rule_id}}", get_policy, allow_head=False)
    r.add_put(f"{p}/policies/{{rule_id}}", update_policy)
    r.add_delete(f"{p}/policies/{{rule_id}}", delete_policy)
    r.add_get(f"{p}/stats", stats, allow_head=False)
    r.add_get(f"{p}/stats/packets", packet_stats, allow_head=False)
    r.add_get(f"{p}/stats/policies", policy_stats, allow_head=False)
    r.add_get(f"{p}/sessions", sessions, allow_head=False)
    # The live event feed (WebSocket upgrade), behind the same Host and token checks; its
    # handler checks Origin itself (a WebSocket handshake is a GET browsers send cross-origin).
    r.add_get(FLOWS_PATH, flows, allow_head=False)
    r.add_get(f"{p}/openapi.json", openapi, allow_head=False)
    r.add_get("/metrics", metrics, allow_head=False)
    add_viewer_routes(app)
    return app


# ---- serving -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenAddress:
    """One `--api` value: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def host_of(listen: str) -> str | None:
    """The host of one `--api` value (for `ApiContext.bind_hosts`); None for a Unix socket
    or a value `parse_listen` rejects."""
    try:
        return parse_listen(listen).host
    except ValueError:
        return None


def parse_listen(value: str) -> ListenAddress:
    """Parse `HOST:PORT`, `[IPv6]:PORT` or `unix:/path`; ValueError says what is wrong."""
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ValueError(f"{value!r}: give the socket's path, e.g. unix:/run/microseg.sock")
        return ListenAddress(path=Path(path))
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ip(host) or ":" not in host:
            raise ValueError(f"{value!r}: {host!r} in brackets is not an IPv6 address")
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080) or unix:/path")
    return ListenAddress(host=host, port=int(port))


def _unix_socket(path: Path) -> socket.socket:
    """A bound Unix socket at `path`, mode 0660 before anyone can connect; a stale socket
    file is replaced, a live one (another agent) or any other file is an error."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiSetupError(f"--api unix:{path}: the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ApiSetupError(f"--api unix:{path}: {e.strerror}") from e
            path.unlink(missing_ok=True)  # stale: nobody listens on it
        else:
            raise ApiSetupError(f"--api unix:{path}: another process is serving on it")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Before listen(): nobody can connect while the mode is still the umask's.
        os.chmod(path, 0o660)
    except OSError as e:
        sock.close()
        raise ApiSetupError(f"--api unix:{path}: {e.strerror}") from e
    return sock


async def start_api(ctx: ApiContext, listen: list[str]) -> web.AppRunner:
    """Serve `make_app(ctx)` on every `listen` address (see `parse_listen`).

    The TCP hosts are added to `ctx.bind_hosts`. Returns the runner; the caller awaits
    `runner.cleanup()` to stop (which also closes the Unix sockets; their files stay and are
    replaced at the next start). Raises ApiSetupError when an address cannot be served.
    """
    addresses: list[ListenAddress] = []
    for item in listen:
        try:
            addresses.append(parse_listen(item))
        except ValueError as e:
            raise ApiSetupError(f"--api {e}") from None
    ctx.bind_hosts.update(a.host.lower() for a in addresses if a.host is not None)
    runner = web.AppRunner(make_app(ctx), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        for address in addresses:
            site: web.BaseSite
            if address.path is not None:
                site = web.SockSite(runner, _unix_socket(address.path), shutdown_timeout=5)
            else:
                site = web.TCPSite(
                    runner, address.host, address.port, reuse_address=True, shutdown_timeout=5
                )
            try:
                await site.start()
            except OSError as e:
                raise ApiSetupError(f"--api {address}: {e.strerror or e}") from e
            log.debug("API listening on %s", address)
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def load_or_create_token(state_dir: Path) -> str:
    """The API token in `<state_dir>/api-token`, created (mode 0600) at first start.

    Raises ApiSetupError when the file is readable or writable by group or others, is not a
    regular file, or is empty: the agent must not run with a token others can read.
    """
    path = state_dir / TOKEN_FILE
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as e:
        raise ApiSetupError(f"cannot create the API token {path}: {e.strerror}") from e
    token = secrets.token_urlsafe(32)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ApiSetupError(f"cannot write the API token {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    log.info("created the API token in %s", path)
    return token


def _read_token(path: Path) -> str:
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise ApiSetupError(f"the API token {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ApiSetupError(
                f"the API token {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}` (and consider "
                "replacing the token: delete the file and restart the agent)"
            )
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ApiSetupError(f"cannot read the API token {path}: {e}") from e
    if not token:
        raise ApiSetupError(f"the API token {path} is empty: delete it to have a new one made")
    return token


# ---- the viewer -------------------------------------------------------------------------------
#
# The browser viewer (static files in streamer/viewer/) at `/`. A browser must never be handed
# the API token (it would end up in URLs, history and logs), so it signs in with a one-time code
# instead: the agent prints `http://HOST:PORT/login?code=C` at start, and `POST
# /api/v1/viewer/codes` (token required; `microseg viewer-url`) mints another. Opening the link
# trades the code (single use, expiring) for an HttpOnly, SameSite=Strict session cookie, which
# the API accepts on reads only (GET/HEAD: the pages, the feed, stats), never on writes. Codes
# and sessions live in this process's memory: an agent restart signs every browser out. No
# access log is kept (start_api), and the debug log names only a request's path, never its
# query, so neither codes nor cookies reach a log.

VIEWER_COOKIE: Final = "microseg_session"
LOGIN_PATH: Final = "/login"
VIEWER_CODES_PATH: Final = f"{API_PREFIX}/viewer/codes"
FLOWS_RECENT_PATH: Final = f"{FLOWS_PATH}/recent"
RECENT_LIMIT_MAX: Final = 10_000
_VIEWER_ASSETS: Final[dict[str, str]] = {"app.js": "text/javascript", "style.css": "text/css"}
# These check their own authentication (and answer a browser with a page, not JSON).
VIEWER_PAGE_PATHS: Final = frozenset({"/", LOGIN_PATH, *(f"/viewer/{n}" for n in _VIEWER_ASSETS)})
_CODE_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_VIEWER_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
VIEWER_FILES: Final = web.AppKey("microseg_viewer_files", dict)


class ViewerAuth:
    """One-time sign-in codes and the browser sessions they open; in memory, bounded.

    `mint()` -> a new code, valid `code_ttl` seconds. `redeem(code)` -> a new session id, or None
    for a code that is unknown, used or expired (a code works once, whatever the outcome).
    `session_ok(sid)` -> whether a cookie's session is live. Beyond `max_codes`/`max_sessions`
    the ones closest to expiry are dropped. Only hashes are kept, so a memory dump or a timing
    difference in the lookup gives nothing away.
    """

    def __init__(
        self,
        code_ttl: float = 1800.0,
        session_ttl: float = 12 * 3600.0,
        max_codes: int = 64,
        max_sessions: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.code_ttl = code_ttl
        self.session_ttl = session_ttl
        self._max_codes = max_codes
        self._max_sessions = max_sessions
        self._clock = clock
        self._codes: dict[bytes, float] = {}
        self._sessions: dict[bytes, float] = {}

    @staticmethod
    def _key(secret: str) -> bytes:
        return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()

    def _make_room(self, table: dict[bytes, float], limit: int) -> None:
        now = self._clock()
        for key in [k for k, expiry in table.items() if expiry <= now]:
            del table[key]
        while len(table) >= limit:
            del table[min(table, key=table.__getitem__)]

    def mint(self) -> str:
        self._make_room(self._codes, self._max_codes)
        code = secrets.token_urlsafe(24)
        self._codes[self._key(code)] = self._clock() + self.code_ttl
        return code

    def redeem(self, code: str) -> str | None:
        expiry = self._codes.pop(self._key(code), None)
        if expiry is None or expiry <= self._clock():
            return None
        self._make_room(self._sessions, self._max_sessions)
        sid = secrets.token_urlsafe(32)
        self._sessions[self._key(sid)] = self._clock() + self.session_ttl
        return sid

    def session_ok(self, sid: str | None) -> bool:
        if not sid or len(sid) > 128:
            return False
        expiry = self._sessions.get(self._key(sid))
        return expiry is not None and expiry > self._clock()


def _cookie_name(request: web.BaseRequest) -> str:
    # Browsers share cookies across the ports of one host: one name per port keeps two
    # agents on one machine (say, on 8080 and 8081) from signing each other's browsers out.
    try:
        port = request.url.port
    except ValueError:
        port = None
    return f"{VIEWER_COOKIE}_{port}" if port else VIEWER_COOKIE


def _viewer_cookie_ok(request: web.BaseRequest, ctx: ApiContext) -> bool:
    """A read (GET/HEAD) carrying a live viewer session cookie."""
    return request.method in ("GET", "HEAD") and ctx.viewer.session_ok(
        request.cookies.get(_cookie_name(request))
    )


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
    return _html(401, "microseg: sign in", f"<h1>microseg flows: sign in</h1><p>{reason}</p>"
                 + _SIGN_IN_HELP)


def _viewer_file(request: web.Request, name: str) -> bytes:
    files: dict[str, bytes] = request.app[VIEWER_FILES]
    if name not in files:
        from importlib.resources import files as resource_files

        files[name] = (resource_files("streamer") / "viewer" / name).read_bytes()
    return files[name]


async def viewer_index(request: web.Request) -> web.Response:
    """GET /: the viewer page for a signed-in browser (or a token); else the sign-in help."""
    try:
        _authenticate(request, request.app[CTX])
    except ApiError:
        return _sign_in_page("This browser is not signed in to this agent.")
    return web.Response(
        body=_viewer_file(request, "index.html"),
        content_type="text/html",
        charset="utf-8",
        headers=dict(_VIEWER_HEADERS),
    )


def _viewer_asset(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        _query(request)
        _authenticate(request, request.app[CTX])
        return web.Response(
            body=_viewer_file(request, name),
            content_type=_VIEWER_ASSETS[name],
            charset="utf-8",
            headers=dict(_VIEWER_HEADERS),
        )

    return handler


async def viewer_login(request: web.Request) -> web.Response:
    """GET /login?code=C: trade a one-time code for a session cookie, then go to `/`."""
    code = _query(request, ("code",)).get("code", "")
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
            _cookie_name(request),
            sid,
            max_age=int(ctx.viewer.session_ttl),
            path="/",
            httponly=True,
            samesite="Strict",
        )
    return response


async def viewer_codes(request: web.Request) -> web.Response:
    """POST /api/v1/viewer/codes: a new one-time sign-in link (path and query) for a browser."""
    _query(request)
    viewer = request.app[CTX].viewer
    return _json(
        {
            "path": f"{LOGIN_PATH}?code={viewer.mint()}",
            "expires_in_seconds": int(viewer.code_ttl),
        },
        201,
        {"Cache-Control": "no-store"},
    )


async def flows_recent(request: web.Request) -> web.Response:
    """GET /api/v1/flows/recent: the last `limit` records of the feed matching the filters
    (oldest first), from the feed's bounded memory of recent records."""
    from streamer.events.sinks.websocket import FILTER_PARAMS, FlowFilter

    query = _query(request, (*FILTER_PARAMS, "limit"))
    limit = _int_param("limit", query.pop("limit", "100"), 1, RECENT_LIMIT_MAX)
    try:
        flt = FlowFilter.parse(query)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    hub = request.app[CTX].flows
    recent = list(hub.recent) if hub is not None else []  # no feed: nothing kept
    picked: list[bytes] = []
    for item in reversed(recent):
        if flt.any or flt.matches(item.obj):
            picked.append(item.data)
            if len(picked) == limit:
                break
    picked.reverse()
    body = b'{"events":[' + b",".join(picked) + b'],"count":%d,"kept":%d}' % (
        len(picked),
        (hub.recent.maxlen or 0) if hub is not None else 0,
    )
    return web.Response(body=body, content_type="application/json")


def add_viewer_routes(app: web.Application) -> None:
    """The viewer's page and files, its sign-in, code minting and the recent-records route."""
    app[VIEWER_FILES] = {}
    r = app.router
    r.add_get("/", viewer_index, allow_head=False)
    for name in _VIEWER_ASSETS:
        r.add_get(f"/viewer/{name}", _viewer_asset(name), allow_head=False)
    r.add_get(LOGIN_PATH, viewer_login, allow_head=False)
    r.add_post(VIEWER_CODES_PATH, viewer_codes)
    r.add_get(FLOWS_RECENT_PATH, flows_recent, allow_head=False)


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
