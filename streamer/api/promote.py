"""Promote: staged rules made enforced (contract §6), `POST /api/v1/policies/{rule_id}/promote`
and, for several rules in one generation, `POST /api/v1/policies/promote` with
`{"rule_ids": [...]}`.

In: the rule ids; the store and the datapath's per-rule counters of the `ApiContext`. Out:
`{"generation": G, "promoted": [{"rule_id", "staged_packets", "staged_bytes",
"staged_flows"}]}`: what each rule decided while staged (read just before the change), and
with `?dry_run=1` the same beside the dry run's diff and re-judged sessions, nothing changed;
with `?confirm_within=S` it reverts unless confirmed (`pending` in the answer), and the lockout
guard checks it like every write (`?force=1`).
Errors: 404 unknown rule, 409 `not_staged`, 409 `staged_agent` on an agent that stages every
rule (--policy-mode staged), 400 for a bad body; nothing changes on any of them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from streamer.api.context import ACTOR, CTX, ApiContext, ApiError, json_response
from streamer.api.params import SMALL_BODY_LIMIT, path_rule_id, read_json
from streamer.api.policies import write_change
from streamer.api.rollout import write_params
from streamer.policy.model import MAX_RULE_ID
from streamer.vocabulary import Mode

MAX_PROMOTE = 10_000


async def promote_one(request: web.Request) -> web.Response:
    return await _promote(request, [path_rule_id(request)])


async def promote_many(request: web.Request) -> web.Response:
    data = await read_json(request, SMALL_BODY_LIMIT)
    ids = data.get("rule_ids") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or set(data) != {"rule_ids"}
        or not isinstance(ids, list)
        or not ids
        or len(ids) > MAX_PROMOTE
        or not all(type(i) is int and 1 <= i <= MAX_RULE_ID for i in ids)
    ):
        raise ApiError(
            400,
            'expected {"rule_ids": [ID, ...]}: 1 to '
            f"{MAX_PROMOTE:,} rule ids, each an int 1..{MAX_RULE_ID}",
        )
    return await _promote(request, ids)


async def _promote(request: web.Request, rule_ids: list[int]) -> web.Response:
    dry_run, opts = write_params(request)
    ctx = request.app[CTX]
    if ctx.policy_mode is Mode.STAGED:
        raise ApiError(
            409,
            "this agent runs with --policy-mode staged: every rule is staged whatever its "
            "mode, so a promote would enforce nothing; run it with --policy-mode enforce",
            code="staged_agent",
        )
    promoted = [_staged_counters(ctx, rid) for rid in dict.fromkeys(rule_ids)]
    result = await write_change(request, ctx.store.promote(rule_ids, request[ACTOR], dry_run, opts))
    body: dict[str, Any] = {"generation": result.generation, "promoted": promoted}
    if dry_run:
        body = {**result.to_api(), **body}
    body = result.with_pending(body)
    return json_response(body, 200, {"X-Policy-Generation": str(result.generation)})


def _staged_counters(ctx: ApiContext, rule_id: int) -> dict[str, int]:
    c = ctx.datapath.rule_counters(rule_id)
    return {
        "rule_id": rule_id,
        "staged_packets": c.staged_packets,
        "staged_bytes": c.staged_bytes,
        "staged_flows": c.staged_flows,
    }
