"""The agent's state: `/api/v1/health` (the API answers) and `/api/v1/status` (what runs).

In: requests, and the store, datapath and settings of the `ApiContext`. Out: JSON. /status says
"degraded" when the classifier is not loaded or the kernel enforces another policy generation
than the store holds; a kernel generation that cannot be read counts as 0 (and is logged).
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from streamer.api.context import CTX, json_response
from streamer.api.params import query_params
from streamer.api.stats import current_stats

__all__ = ["health", "status"]

log = logging.getLogger("microseg.api")


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "message": "API server is healthy"})


async def status(request: web.Request) -> web.Response:
    query_params(request)
    ctx = request.app[CTX]
    stats = await current_stats(ctx)
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
    return json_response(
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
            "policy_mode": ctx.policy_mode.value,
            "failsafe": [str(f) for f in ctx.failsafe],
            # The change waiting for its confirmation (contract §6), or null.
            "pending": ctx.store.pending.status() if ctx.store.pending is not None else None,
            # Fleet mode (contract §7): this host, its labels, the fleet generation, or null.
            "fleet": ctx.fleet.describe() if ctx.fleet is not None else None,
            # The flow feeds `?source=` of /api/v1/flows names (the viewer's fleet toggle).
            "flow_sources": ["local", *(["fleet"] if ctx.fleet_flows is not None else [])],
            "uptime_seconds": max(0, int(time.monotonic() - ctx.started_monotonic)),
        }
    )
