"""The flow feed's routes: `/api/v1/flows` (a live WebSocket) and `/api/v1/flows/recent`.

In: requests with the feed's filters (verdict, ip, port, protocol, rule_id, staged), `source`
(`local`, the default: this agent's own feed; `fleet`: every agent's, from the fleet's flows
topic, contract §7) and that feed of the `ApiContext` (a
`streamer.events.sinks.websocket.WebSocketHub`, which streams and keeps the recent records).
Out: the WebSocket upgrade, or the last `limit` matching records (100 by default, oldest
first) as JSON. No feed: the WebSocket answers 503 and the recent list is empty (for
`source=fleet`: the agent is given no fleet flows topic). The WebSocket refuses a cross-site
`Origin` itself, since browsers send a handshake (a GET) cross-origin.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from streamer.api.context import CTX, FLOWS_PATH, ApiError, short
from streamer.api.params import int_param, query_params

__all__ = ["FLOWS_RECENT_PATH", "RECENT_LIMIT_MAX", "flows", "flows_recent"]

FLOWS_RECENT_PATH: Final = f"{FLOWS_PATH}/recent"
RECENT_LIMIT_MAX: Final = 10_000
_FLOW_PARAMS: Final = ("verdict", "ip", "port", "protocol", "rule_id", "staged", "token", "source")
SOURCES: Final = ("local", "fleet")


def _hub(request: web.Request, query: dict[str, str]) -> Any:
    """The feed `source` names (popped from `query`): the agent's own, or the fleet's."""
    source = query.pop("source", "local")
    if source not in SOURCES:
        raise ApiError(400, f"source: {short(source)!r}: use local or fleet")
    ctx = request.app[CTX]
    return ctx.fleet_flows if source == "fleet" else ctx.flows


async def flows(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/flows: upgrade to a WebSocket streaming flow events (see
    streamer/events/sinks/websocket.py); filters in the query string."""
    from streamer.events.sinks.websocket import FlowFilter

    query = query_params(request, _FLOW_PARAMS)
    hub = _hub(request, query)
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
                f"cross-site WebSocket refused: Origin {short(origin)!r} is not this API's own",
            )
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise ApiError(
            400, "this route is a WebSocket: connect with a WebSocket client (Upgrade: websocket)"
        )
    if hub is None:
        if request.query.get("source") == "fleet":
            raise ApiError(503, "this agent is given no fleet flows topic (no fleet feed)")
        raise ApiError(503, "this agent runs no flow event feed")
    if hub.closed or not hub.has_room():
        raise ApiError(503, "the flow feed takes no more clients right now")
    response: web.StreamResponse = await hub.serve(request, flt)
    return response


async def flows_recent(request: web.Request) -> web.Response:
    """GET /api/v1/flows/recent: the last `limit` records of the feed matching the filters
    (oldest first), from the feed's bounded memory of recent records."""
    from streamer.events.sinks.websocket import FILTER_PARAMS, FlowFilter

    query = query_params(request, (*FILTER_PARAMS, "limit", "source"))
    hub = _hub(request, query)
    limit = int_param("limit", query.pop("limit", "100"), 1, RECENT_LIMIT_MAX)
    try:
        flt = FlowFilter.parse(query)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    recent = list(hub.recent) if hub is not None else []  # no feed: nothing kept
    picked: list[bytes] = []
    for item in reversed(recent):
        if flt.any or flt.matches(item.obj):
            picked.append(item.data)
            if len(picked) == limit:
                break
    picked.reverse()
    body = (
        b'{"events":['
        + b",".join(picked)
        + b'],"count":%d,"kept":%d}'
        % (
            len(picked),
            (hub.recent.maxlen or 0) if hub is not None else 0,
        )
    )
    return web.Response(body=body, content_type="application/json")
