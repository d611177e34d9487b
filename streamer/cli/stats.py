"""`microseg stats`: the agent's counters through its API.

In: `--packets` or `--policies` (the sub-resources /stats/packets, /stats/policies; neither:
GET /api/v1/stats). Out: `key  value` lines, the main counters first, nested sections as
a.b, rates as percentages; or with `-o json` the answer unchanged. Exit status as for the
other clients (0, 1, 2).
"""

from __future__ import annotations

import argparse
from typing import Any, Final

from streamer.cli.connection import Api, common_parser, expect_dict, run_command
from streamer.cli.output import key_values, print_json

__all__ = ["add_stats_parser", "cmd_stats"]

STATS_ORDER: Final = (
    "total_packets",
    "allowed_packets",
    "denied_packets",
    "allow_rate",
    "deny_rate",
    "new_sessions",
    "closed_sessions",
    "active_sessions",
    "policy_hits",
    "policy_misses",
    "hit_rate",
)


async def _stats(api: Api, args: argparse.Namespace) -> int:
    path = "/stats/packets" if args.packets else "/stats/policies" if args.policies else "/stats"
    data = expect_dict(await api.call("GET", path), api, f"GET {path}")
    if args.output == "json":
        print_json(data)
    else:
        print(key_values(data, STATS_ORDER))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """`stats`: the agent's counters (`--packets`, `--policies`: the sub-resources)."""
    return run_command(args, _stats)


def add_stats_parser(subparsers: Any) -> None:
    """Register `stats` on the `microseg` subparsers."""
    p = subparsers.add_parser("stats", parents=[common_parser()], help="the agent's counters")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--packets", action="store_true", help="packet counters and rates")
    which.add_argument("--policies", action="store_true", help="rule hit counters and hit rate")
    p.set_defaults(func=cmd_stats)
