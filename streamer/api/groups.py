"""The address group routes (docs/contract.md §5): `/api/v1/groups` (list), `.../{name}` (get,
create or replace, delete) and `.../{name}/members` (add, remove).

In: requests and the `PolicyStore` of the `ApiContext`. Out: groups as JSON. Writes go through
the store, are answered only once the change is enforced in the kernel and saved, carry the
generation in `X-Policy-Generation`, take `?dry_run=1` (and `?confirm_within`, `?force`:
streamer/api/rollout.py), and answer a GroupChange (what went in
and out, what changed nothing); a member change that changes nothing keeps the generation.
Errors: 400 a bad name, member or body; 404 an unknown group; 409 deleting a group rules use;
413 a body above 64 MiB; 415 a body that is not JSON.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson
from aiohttp import web

from streamer.api.context import ACTOR, API_PREFIX, CTX, ApiError, json_response
from streamer.api.params import (
    GROUP_BODY_LIMIT,
    members_body,
    path_group_name,
    query_params,
    read_json,
    validate_group,
)
from streamer.api.policies import write_change
from streamer.api.rollout import write_params
from streamer.policy.model import Group
from streamer.policy.store import ChangeResult

__all__ = [
    "add_members",
    "delete_group",
    "get_group",
    "list_groups",
    "put_group",
    "remove_members",
]

# Bodies with more members than this are validated, and answers serialized, off the event loop.
_BIG: Final = 5000


async def _answer(result: ChangeResult, status: int = 200, **headers: str) -> web.Response:
    body = result.group_to_api()
    hdrs = {"X-Policy-Generation": str(result.generation), **headers}
    size = len(result.members_added) + len(result.members_removed)
    if size > _BIG:
        raw = await asyncio.to_thread(orjson.dumps, body)
        return web.Response(body=raw, status=status, content_type="application/json", headers=hdrs)
    return json_response(body, status, hdrs)


async def list_groups(request: web.Request) -> web.Response:
    query_params(request)
    policy = request.app[CTX].store.policy
    users = policy.group_users()
    groups = [
        {"name": name, "member_count": len(group.members), "rules": users.get(name, [])}
        for name, group in sorted(policy.groups.items())
    ]
    return json_response({"groups": groups, "count": len(groups)})


def _group_detail(name: str, group: Group, rules: list[int]) -> bytes:
    return orjson.dumps(
        {
            "name": name,
            "members": list(group.members),
            "member_count": len(group.members),
            "rules": rules,
        }
    )


async def get_group(request: web.Request) -> web.Response:
    name = path_group_name(request)
    query_params(request)
    policy = request.app[CTX].store.policy
    group = policy.groups.get(name)
    if group is None:
        raise ApiError(404, f"no group named {name!r}")
    rules = policy.rules_using(name)
    if len(group.members) > _BIG:
        body = await asyncio.to_thread(_group_detail, name, group, rules)
    else:
        body = _group_detail(name, group, rules)
    return web.Response(body=body, content_type="application/json")


def _member_count(data: Any) -> int:
    members = data.get("members") if isinstance(data, dict) else None
    return len(members) if isinstance(members, list) else 0


async def put_group(request: web.Request) -> web.Response:
    name = path_group_name(request)
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    data = await read_json(request, GROUP_BODY_LIMIT)
    if _member_count(data) > _BIG:
        group = await asyncio.to_thread(validate_group, data)
    else:
        group = validate_group(data)
    result = await write_change(
        request, ctx.store.set_group(name, group, request[ACTOR], dry_run, opts)
    )
    if result.group_created and not dry_run:
        return await _answer(result, 201, Location=f"{API_PREFIX}/groups/{name}")
    return await _answer(result)


async def delete_group(request: web.Request) -> web.Response:
    name = path_group_name(request)
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    result = await write_change(
        request, ctx.store.delete_group(name, request[ACTOR], dry_run, opts)
    )
    return await _answer(result)


async def add_members(request: web.Request) -> web.Response:
    name = path_group_name(request)
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    members = members_body(await read_json(request, GROUP_BODY_LIMIT))
    store = ctx.store
    result = await write_change(
        request, store.add_members(name, members, request[ACTOR], dry_run, opts)
    )
    return await _answer(result)


async def remove_members(request: web.Request) -> web.Response:
    name = path_group_name(request)
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    members = members_body(await read_json(request, GROUP_BODY_LIMIT))
    store = ctx.store
    result = await write_change(
        request, store.remove_members(name, members, request[ACTOR], dry_run, opts)
    )
    return await _answer(result)
