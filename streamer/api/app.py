"""The admin API (contract §3) as one aiohttp application: the checks every request passes, and
the route table (`make_app`) naming the module that handles each route.

In: HTTP requests (streamer/api/serve.py serves them on TCP and Unix sockets). Out: JSON bodies;
every error is `{"error": code, "message": text}` (never a stack trace; the traceback of an
unexpected failure goes only to the log). Policy writes go through the `PolicyStore` and are
answered only once the change is enforced in the kernel and saved.

Checks, in order, before any handler runs (streamer/api/auth.py):
1. 421 when `Host` names neither an address the API is bound to nor localhost (DNS rebinding);
   Unix-socket requests are exempt (no browser reaches them).
2. 403 when a write (any method but GET/HEAD/OPTIONS) carries an `Origin` other than the API's
   own (`http://<Host>`): a cross-site request.
3. 401 when the bearer token is missing or wrong (constant-time compare), except on
   `/api/v1/health` and `/metrics`, with `--no-auth` (token None), and on Unix sockets, where
   the socket file's mode (0660) decides who may connect.
Then the route: unknown → 404, wrong method → 405 (with `Allow`), unknown query parameter → 400
(a typo like `?dryrun=1` must not apply a change), body not `application/json` → 415, too large
→ 413 (64 KiB; 64 MiB for `PUT /api/v1/policies` and the group routes), bad JSON or invalid rule
or group → 400 (streamer/api/params.py).

No CORS headers are ever sent: browsers on other origins cannot read answers.
`DELETE /api/v1/policies/{rule_id}` answers 200 with the deleted rule. Writes carry the new
policy generation in the `X-Policy-Generation` header. Address groups: streamer/api/groups.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from streamer.api import (
    flows,
    groups,
    policies,
    promote,
    rollout,
    sessions,
    stats,
    status,
    viewer,
)
from streamer.api.auth import PUBLIC_PATHS, authenticate, check_host, check_origin
from streamer.api.context import (
    ACTOR,
    API_PREFIX,
    CTX,
    FLOWS_PATH,
    STATUS_CODES,
    ApiContext,
    ApiError,
    error_response,
    short,
)
from streamer.api.metrics import ApiMetrics, MicrosegCollector, api_metrics, register_collector
from streamer.api.openapi import build_openapi
from streamer.api.params import WHOLE_SET_BODY_LIMIT, query_params
from streamer.policy.store import StoreError

__all__ = ["make_app"]

log = logging.getLogger("microseg.api")

_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"})
METRICS: Final = web.AppKey("microseg_metrics", ApiMetrics)
OPENAPI: Final = web.AppKey("microseg_openapi", bytes)


def _route_label(request: web.BaseRequest) -> str:
    match_info = getattr(request, "match_info", None)
    resource = match_info.route.resource if match_info is not None else None
    return resource.canonical if resource is not None else "unmatched"


def _http_exception(exc: web.HTTPException, request: web.BaseRequest) -> web.Response:
    """aiohttp's own errors (unknown route, wrong method, ...) as JSON."""
    http_status = exc.status
    path = short(request.path)
    if http_status == 404:
        message = f"no such route: {request.method} {path} (see {API_PREFIX}/openapi.json)"
    elif http_status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"{short(request.method, 20)} is not allowed on {path}; allowed: {allowed}"
    elif http_status == 413:
        message = "the body is too large"
    else:
        message = exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return error_response(
        http_status, STATUS_CODES.get(http_status, f"http_{http_status}"), message, headers=headers
    )


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    ctx = request.app[CTX]
    started = time.perf_counter()
    http_status = 500
    try:
        response = await _dispatch(request, handler, ctx)
        http_status = response.status
        return response
    except asyncio.CancelledError:
        http_status = 499  # the client went away
        raise
    finally:
        elapsed = time.perf_counter() - started
        method = request.method if request.method in _KNOWN_METHODS else "other"
        request.app[METRICS].observe(_route_label(request), method, http_status, elapsed)
        log.debug(
            "%s %s -> %d in %.1f ms", method, short(request.path), http_status, elapsed * 1000
        )


async def _dispatch(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ctx: ApiContext,
) -> web.StreamResponse:
    try:
        check_host(request, ctx)
        check_origin(request)
        if request.path not in PUBLIC_PATHS and request.path not in viewer.VIEWER_PAGE_PATHS:
            request[ACTOR] = authenticate(request, ctx)
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message, e.errors, e.headers)
    except StoreError as e:
        return error_response(e.status, e.code, str(e))
    except web.HTTPException as e:
        return _http_exception(e, request)
    except (ConnectionResetError, asyncio.IncompleteReadError) as e:
        log.info("%s %s: the client went away: %s", request.method, request.path, e)
        return error_response(400, "invalid", "the request was cut short")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error: the agent's log has the details")


# The two routes that serve what make_app builds: the OpenAPI document and the registry.


async def openapi(request: web.Request) -> web.Response:
    query_params(request)
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    # The collector reads kernel maps (and may walk the session table): off the event loop.
    body = await asyncio.to_thread(generate_latest, request.app[CTX].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


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
    app[policies.PENDING_WRITES] = set()
    app.on_cleanup.append(policies.await_pending_writes)
    app[viewer.VIEWER_FILES] = {}
    r = app.router
    p = API_PREFIX
    r.add_get(f"{p}/health", status.health, allow_head=False)
    r.add_get(f"{p}/status", status.status, allow_head=False)
    r.add_get(f"{p}/policies", policies.list_policies, allow_head=False)
    r.add_post(f"{p}/policies", policies.add_policy)
    r.add_put(f"{p}/policies", policies.replace_policies)
    # Before {rule_id}: "reload" and "confirm" are no rule_ids.
    r.add_post(f"{p}/policies/reload", policies.reload_policies)
    r.add_post(f"{p}/policies/promote", promote.promote_many)
    r.add_post(f"{p}/policies/{{rule_id}}/promote", promote.promote_one)
    r.add_post(f"{p}/policies/confirm", rollout.confirm_policies)
    r.add_get(f"{p}/policies/{{rule_id}}", policies.get_policy, allow_head=False)
    r.add_put(f"{p}/policies/{{rule_id}}", policies.update_policy)
    r.add_delete(f"{p}/policies/{{rule_id}}", policies.delete_policy)
    r.add_get(f"{p}/groups", groups.list_groups, allow_head=False)
    r.add_get(f"{p}/groups/{{name}}", groups.get_group, allow_head=False)
    r.add_put(f"{p}/groups/{{name}}", groups.put_group)
    r.add_delete(f"{p}/groups/{{name}}", groups.delete_group)
    r.add_post(f"{p}/groups/{{name}}/members", groups.add_members)
    r.add_delete(f"{p}/groups/{{name}}/members", groups.remove_members)
    r.add_get(f"{p}/stats", stats.stats, allow_head=False)
    r.add_get(f"{p}/stats/packets", stats.packet_stats, allow_head=False)
    r.add_get(f"{p}/stats/policies", stats.policy_stats, allow_head=False)
    r.add_get(f"{p}/sessions", sessions.sessions, allow_head=False)
    # The live event feed (WebSocket upgrade), behind the same Host and token checks; its
    # handler checks Origin itself (a WebSocket handshake is a GET browsers send cross-origin).
    r.add_get(FLOWS_PATH, flows.flows, allow_head=False)
    r.add_get(f"{p}/openapi.json", openapi, allow_head=False)
    r.add_get("/metrics", metrics, allow_head=False)
    # The browser viewer: its page and files, its sign-in, code minting, the recent records.
    r.add_get("/", viewer.viewer_index, allow_head=False)
    for name in viewer.VIEWER_ASSETS:
        r.add_get(f"/viewer/{name}", viewer.viewer_asset(name), allow_head=False)
    r.add_get(viewer.LOGIN_PATH, viewer.viewer_login, allow_head=False)
    r.add_post(viewer.VIEWER_CODES_PATH, viewer.viewer_codes)
    r.add_get(flows.FLOWS_RECENT_PATH, flows.flows_recent, allow_head=False)
    return app
