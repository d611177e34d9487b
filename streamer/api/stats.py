"""The counter routes: `/api/v1/stats`, `/api/v1/stats/packets` and `/api/v1/stats/policies`.

In: requests, and the datapath's counters with the extra ones of the `ApiContext` (read by
`streamer.api.metrics.read_stats`, off the event loop). Out: the counters as JSON, packet rates in
percent, and the rules ranked by packets (`?limit=`, 100 by default) with the default action's
hits; a rule that was never hit counts zero. Every rule's hits come with its staged counters
(`rule_hits`, also in GET /policies/{rule_id}); a staged rule is marked `"mode": "staged"`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from streamer.api.context import CTX, ApiContext, json_response, wall_time
from streamer.api.metrics import read_stats
from streamer.api.openapi import RULE_LIMIT_MAX
from streamer.api.params import int_param, query_params

__all__ = ["current_stats", "packet_stats", "policy_stats", "rule_hits", "stats"]


async def current_stats(ctx: ApiContext) -> dict[str, Any]:
    # A stale session count walks the whole session table: not on the event loop.
    return await asyncio.to_thread(read_stats, ctx.datapath, ctx.extra_stats)


async def stats(request: web.Request) -> web.Response:
    query_params(request)
    return json_response(await current_stats(request.app[CTX]))


def _rate(part: int, whole: int) -> float:
    return round(part / whole * 100, 4) if whole else 0.0


async def packet_stats(request: web.Request) -> web.Response:
    query_params(request)
    s = await current_stats(request.app[CTX])
    total = s["total_packets"]
    return json_response(
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


def rule_hits(counters: Any) -> dict[str, Any]:
    """A rule's (or the default action's) hit counters and, beside them, its staged counters:
    what it would have decided where the staged view differs (contract §6)."""
    return {
        "packets": int(counters.packets),
        "bytes": int(counters.bytes),
        "last_hit": wall_time(int(counters.last_hit_ns)),
        "staged_packets": int(counters.staged_packets),
        "staged_bytes": int(counters.staged_bytes),
        "staged_flows": int(counters.staged_flows),
    }


async def policy_stats(request: web.Request) -> web.Response:
    query = query_params(request, ("limit",))
    limit = int_param("limit", query.get("limit", "100"), 0, RULE_LIMIT_MAX)
    ctx = request.app[CTX]
    s = await current_stats(ctx)
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
            **({"mode": r.mode.value} if r.staged else {}),
            **rule_hits(per_rule.get(r.rule_id, zero)),
        }
        for r in ranked
    ]
    hits, misses = s["policy_hits"], s["policy_misses"]
    return json_response(
        {
            "policy_hits": hits,
            "policy_misses": misses,
            "hit_rate": _rate(hits, hits + misses),
            "rule_count": len(policy.policies),
            "default": rule_hits(default),
            "rules": rules,
        }
    )


@dataclass(frozen=True)
class _Zero:
    packets: int = 0
    bytes: int = 0
    last_hit_ns: int = 0
    staged_packets: int = 0
    staged_bytes: int = 0
    staged_flows: int = 0
