"""Safe rollout in the API (contract §6): what every write takes, and `POST /policies/confirm`.

In: a write's query (`?dry_run=1`, `?confirm_within=SECONDS`, `?force=1`) and the connection
it came on; a confirmation's body `{"generation": G}`. Out: `write_params` gives the dry-run
flag and the store's WriteOptions: the confirm window (1..3600 s, anything else 400) and,
unless `force` or a dry run, the lockout guard's check for the caller's connection (none for
Unix sockets and loopback callers). `confirm_policies` keeps the pending change: 200
`{"generation": G, "confirmed": true}`; 409 `not_pending` when G is not the pending one; 400 for
a body that is not `{"generation": INT}`.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from streamer.api.context import ACTOR, CTX, ApiError, json_response, short
from streamer.api.params import SMALL_BODY_LIMIT, flag_param, int_param, query_params, read_json
from streamer.policy.lockout import Connection
from streamer.policy.pending import MAX_CONFIRM_S, MIN_CONFIRM_S
from streamer.policy.store import WriteOptions

__all__ = ["WRITE_PARAMS", "confirm_policies", "connection_of", "write_params"]

WRITE_PARAMS: Final = ("dry_run", "confirm_within", "force")


def connection_of(request: web.Request) -> Connection | None:
    """The TCP connection a request came on (None: a Unix socket, or no transport left)."""
    transport = request.transport
    if transport is None:
        return None
    return Connection.of(transport.get_extra_info("sockname"), transport.get_extra_info("peername"))


def write_params(request: web.Request, extra: tuple[str, ...] = ()) -> tuple[bool, WriteOptions]:
    """(dry run, WriteOptions) of a write; its other query parameters may be `extra`."""
    query = query_params(request, (*WRITE_PARAMS, *extra))
    dry_run = flag_param("dry_run", query.get("dry_run"))
    force = flag_param("force", query.get("force"))
    window = query.get("confirm_within")
    confirm_within = (
        int_param("confirm_within", window, MIN_CONFIRM_S, MAX_CONFIRM_S)
        if window is not None
        else None
    )
    guard = request.app[CTX].lockout
    check = None
    if guard is not None and not force and not dry_run:
        check = guard.check_for(connection_of(request))
    return dry_run, WriteOptions(confirm_within=None if dry_run else confirm_within, check=check)


_SHAPE: Final = 'expected {"generation": G}, G the pending change\'s generation'


async def confirm_policies(request: web.Request) -> web.Response:
    query_params(request)
    data = await read_json(request, SMALL_BODY_LIMIT)
    if not isinstance(data, dict):
        raise ApiError(400, f"the body is not an object: {_SHAPE}")
    extra = [k for k in data if k != "generation"]
    if extra:
        raise ApiError(400, f"{short(repr(extra[0]), 40)}: unknown field; {_SHAPE}")
    generation = data.get("generation")
    if generation is None:
        raise ApiError(400, f"generation: missing; {_SHAPE}")
    if type(generation) is not int or generation < 1:
        raise ApiError(
            400,
            f"generation: {short(repr(generation), 40)} is not a generation (an int >= 1); "
            f"{_SHAPE}",
        )
    pending = await request.app[CTX].store.confirm(generation, request[ACTOR])
    return json_response(
        {"generation": pending.generation, "confirmed": True},
        headers={"X-Policy-Generation": str(pending.generation)},
    )
