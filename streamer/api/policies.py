"""The policy routes: `/api/v1/policies` (list, add, replace the whole set), `.../reload` and
`.../{rule_id}` (get with its counters, update, delete).

In: requests, the `PolicyStore` and the datapath (for a rule's counters) of the `ApiContext`.
Out: the rules as JSON; the list also holds the address groups, so that it is the whole policy
document (what `PUT /policies` takes) plus its count and generation. Writes go through the
store and are answered only once the change is enforced in the kernel and saved; they carry the
new generation in `X-Policy-Generation`, and with `?dry_run=1` answer what would change without
changing it; `?confirm_within=S` and `?force=1` as streamer/api/rollout.py reads them (a pending
change adds `pending` to the answer). A request cancelled mid-write (`write_change`) does not
cancel the write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Final

import orjson
from aiohttp import web

from streamer.api.context import (
    ACTOR,
    API_PREFIX,
    CTX,
    ApiError,
    json_response,
    short,
)
from streamer.api.params import (
    SMALL_BODY_LIMIT,
    WHOLE_SET_BODY_LIMIT,
    path_rule_id,
    query_params,
    read_json,
    validate_rule,
    validate_set,
)
from streamer.api.rollout import write_params
from streamer.api.stats import rule_hits
from streamer.policy.store import ChangeResult, PolicyStore, StoreError

__all__ = [
    "PENDING_WRITES",
    "add_policy",
    "await_pending_writes",
    "delete_policy",
    "get_policy",
    "list_policies",
    "reload_policies",
    "replace_policies",
    "update_policy",
    "write_change",
]


log = logging.getLogger("microseg.api")

# Store changes whose request was cancelled: they finish anyway (see write_change).
PENDING_WRITES: Final = web.AppKey("microseg_pending_writes", set[asyncio.Future[ChangeResult]])


async def write_change(request: web.Request, coro: Awaitable[ChangeResult]) -> ChangeResult:
    """Await a store change; if the request is cancelled (the server closing), the change
    still completes (the store's lock stays held until the kernel and disk agree): the app
    keeps it, logs a failure nobody is left to answer, and awaits it as it closes (before
    the agent closes the datapath the change writes to)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        pending = request.app[PENDING_WRITES]
        pending.add(task)
        task.add_done_callback(pending.discard)
        task.add_done_callback(_log_unanswered)
        raise


def _log_unanswered(task: asyncio.Future[ChangeResult]) -> None:
    if task.cancelled():
        return
    e = task.exception()
    if isinstance(e, StoreError):
        log.warning("a policy change whose request was cancelled was refused: %s", e)
    elif e is not None:
        log.error("a policy change whose request was cancelled failed", exc_info=e)


async def await_pending_writes(app: web.Application) -> None:
    """At cleanup: the store changes still running for cancelled requests."""
    pending = app[PENDING_WRITES]
    if pending:
        await asyncio.wait(list(pending))


def _generation_header(result: ChangeResult) -> dict[str, str]:
    return {"X-Policy-Generation": str(result.generation)}


def _policy_list(store: PolicyStore, policy_mode: str) -> bytes:
    policy, generation = store.policy, store.generation
    return orjson.dumps(
        {
            "policies": [r.to_api() for r in policy.policies],
            "count": len(policy.policies),
            "default_action": policy.default_action.value,
            "groups": {name: g.to_api() for name, g in policy.groups.items()},
            "generation": generation,
            # How the agent applies it (contract §6): not part of the document.
            "policy_mode": policy_mode,
            "failsafe": [str(f) for f in store.failsafe],
        }
    )


async def list_policies(request: web.Request) -> web.Response:
    query_params(request)
    ctx = request.app[CTX]
    store, mode = ctx.store, ctx.policy_mode.value
    members = sum(len(g.members) for g in store.policy.groups.values())
    if len(store.policy.policies) > 5000 or members > 20000:
        body = await asyncio.to_thread(_policy_list, store, mode)
    else:
        body = _policy_list(store, mode)
    return web.Response(body=body, content_type="application/json")


async def add_policy(request: web.Request) -> web.Response:
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    rule = validate_rule(await read_json(request, SMALL_BODY_LIMIT))
    result = await write_change(request, ctx.store.add(rule, request[ACTOR], dry_run, opts))
    headers = _generation_header(result)
    if dry_run:
        return json_response(result.to_api(), 200, headers)
    headers["Location"] = f"{API_PREFIX}/policies/{rule.rule_id}"
    return json_response(result.with_pending(rule.to_api()), 201, headers)


def _items(data: object) -> int:
    """About how much validating a document takes: its rules plus a tenth of its members."""
    if not isinstance(data, dict):
        return 0
    rules, groups = data.get("policies"), data.get("groups")
    n = len(rules) if isinstance(rules, list) else 0
    if isinstance(groups, dict):
        for group in groups.values():
            members = group.get("members") if isinstance(group, dict) else None
            n += len(members) // 10 if isinstance(members, list) else 0
    return n


async def replace_policies(request: web.Request) -> web.Response:
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    data = await read_json(request, WHOLE_SET_BODY_LIMIT)
    # A fleet agent takes the fleet form and answers for its own part of it (contract §7): a
    # write is refused by the store (managed), a dry run shows this host's diff and sessions.
    fleet = ctx.fleet
    if _items(data) > 1000:
        policy = await asyncio.to_thread(validate_set, data, fleet is not None)
    else:
        policy = validate_set(data, fleet is not None)
    if fleet is not None:
        policy = fleet.scope(policy)
    result = await write_change(request, ctx.store.replace(policy, request[ACTOR], dry_run, opts))
    size = len(result.added) + len(result.removed) + len(result.changed)
    if size > 5000:
        body = await asyncio.to_thread(lambda: orjson.dumps(result.to_api()))
        return web.Response(
            body=body, content_type="application/json", headers=_generation_header(result)
        )
    return json_response(result.to_api(), 200, _generation_header(result))


async def reload_policies(request: web.Request) -> web.Response:
    dry_run, opts = write_params(request)
    if dry_run:
        raise ApiError(400, "dry_run: a reload has no dry run; use PUT /policies?dry_run=1")
    ctx = request.app[CTX]
    if ctx.reload is None:
        raise ApiError(404, "this agent has no policy file to reload")
    result = await write_change(request, ctx.reload(request[ACTOR], opts))
    return json_response(result.to_api(), 200, _generation_header(result))


async def get_policy(request: web.Request) -> web.Response:
    rule_id = path_rule_id(request)
    query_params(request)
    ctx = request.app[CTX]
    rule = ctx.store.rule(rule_id)
    if rule is None:
        raise ApiError(404, f"no rule with rule_id {rule_id}")
    counters = ctx.datapath.rule_counters(rule_id)
    return json_response({**rule.to_api(), **rule_hits(counters)})


async def update_policy(request: web.Request) -> web.Response:
    rule_id = path_rule_id(request)
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    data = await read_json(request, SMALL_BODY_LIMIT)
    if isinstance(data, dict):
        if "rule_id" in data and not (type(data["rule_id"]) is int and data["rule_id"] == rule_id):
            raise ApiError(
                400,
                f"rule_id: the body's rule_id ({short(orjson.dumps(data['rule_id']).decode())})"
                f" is not the path's ({rule_id}): a rule's id cannot change; delete the rule "
                "and add a new one",
            )
        data = {**data, "rule_id": rule_id}
    rule = validate_rule(data)
    result = await write_change(request, ctx.store.update(rule, request[ACTOR], dry_run, opts))
    if dry_run:
        return json_response(result.to_api(), 200, _generation_header(result))
    return json_response(result.with_pending(rule.to_api()), 200, _generation_header(result))


async def delete_policy(request: web.Request) -> web.Response:
    rule_id = path_rule_id(request)
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    result = await write_change(request, ctx.store.delete(rule_id, request[ACTOR], dry_run, opts))
    if dry_run:
        return json_response(result.to_api(), 200, _generation_header(result))
    body = result.with_pending(result.removed[0].to_api())
    return json_response(body, 200, _generation_header(result))
