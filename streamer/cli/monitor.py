"""`microseg monitor`: the classifier under load, live in a terminal.

In: the agent's `GET /api/v1/stats` every `--interval` seconds (its `pressure` section is the
agent's last reading of the tables: streamer/agent/pressure.py). Out: one screen per reading —
sessions (active, half-open, new/SYN/closed/expired per second), the fill and evictions of
every kernel table, drops by reason (totals and per second), events sent and lost, and the
alerts firing. On a terminal the screen is redrawn in place; otherwise readings follow each
other. `--once` prints one and exits; `-o json` prints each reading's `pressure` object (plus
events and drops) as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import orjson

from streamer.cli import argtypes
from streamer.cli.connection import Api, common_parser, run_client
from streamer.cli.errors import ClientError

CLEAR = "\033[H\033[2J"


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "-" if v is None else str(v)


def render(stats: Mapping[str, Any], where: str, now: float | None = None) -> str:
    """One screen from a `/api/v1/stats` answer."""
    p: Mapping[str, Any] = stats.get("pressure") or {}
    fill: Mapping[str, Any] = p.get("fill") or {}
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    lines = [f"microseg monitor · {where} · {clock}", ""]
    cap = stats.get("session_table_capacity") or (fill.get("sessions") or {}).get("capacity")
    active = stats.get("active_sessions", p.get("active_sessions"))
    ratio = f" ({active / cap:.1%})" if isinstance(active, int) and cap else ""
    lines.append(
        f"sessions  active {_num(active)} / {_num(cap)}{ratio}"
        f"   half-open {_num(p.get('half_open_sessions', stats.get('half_open_sessions')))}"
    )
    lines.append(
        f"          new {_num(p.get('new_sessions_per_s'))}/s"
        f"   SYN {_num(p.get('syn_new_sessions_per_s'))}/s"
        f"   closed {_num(p.get('closed_sessions_per_s'))}/s"
        f"   expired {_num(p.get('expired_sessions_per_s'))}/s"
    )
    lines.append("")
    lines.append(f"{'table':<12}{'entries':>12}{'capacity':>12}{'fill':>8}{'evictions':>11}")
    for name, f in sorted(fill.items()):
        r = float(f.get("ratio", 0.0))
        mark = "  !!" if r >= 0.95 else "  !" if r >= 0.8 else ""
        lines.append(
            f"{name:<12}{_num(f.get('entries')):>12}{_num(f.get('capacity')):>12}"
            f"{r:>8.1%}{_num(f.get('evictions')):>11}{mark}"
        )
    if not fill:
        lines.append("(no reading of the tables yet)")
    lines.append("")
    drops: Mapping[str, Any] = stats.get("drops") or p.get("drops") or {}
    rates: Mapping[str, Any] = p.get("drops_per_s") or {}
    lines.append(
        "drops     "
        + "   ".join(
            f"{reason} {_num(n)} ({_num(rates.get(reason))}/s)" for reason, n in drops.items()
        )
    )
    lines.append(
        f"events    sent {_num(stats.get('events_sent'))}   lost {_num(stats.get('events_lost'))}"
    )
    lines.append("")
    alerts = p.get("alerts") or []
    if not alerts:
        lines.append("alerts    none")
    for i, a in enumerate(alerts):
        lines.append(
            f"{'alerts' if i == 0 else '':<10}{str(a.get('severity')).upper()} {a.get('alert')}"
            f" [{a.get('subject')}] {a.get('message')} (for {_num(a.get('since_seconds'))} s)"
        )
    return "\n".join(lines)


def _json_line(stats: Mapping[str, Any]) -> bytes:
    out = dict(stats.get("pressure") or {})
    for key in ("active_sessions", "closed_sessions", "events_sent", "events_lost", "drops"):
        if key in stats:
            out[key] = stats[key]
    return orjson.dumps(out) + b"\n"


async def monitor(api: Api, args: argparse.Namespace, out: IO[str]) -> int:
    """Read and show `/stats` every args.interval s: args.count times (0: until stopped)."""
    tty = out.isatty() and args.output != "json"
    shown = 0
    while True:
        stats = await api.call("GET", "/stats")
        if not isinstance(stats, dict):
            raise ClientError("the agent's /stats answer is not an object")
        if args.output == "json":
            out.write(_json_line(stats).decode())
        else:
            screen = render(stats, api.endpoint.display)
            out.write((CLEAR + screen + "\n") if tty else (screen + "\n\n"))
        out.flush()
        shown += 1
        if args.once or (args.count and shown >= args.count):
            return 0
        await asyncio.sleep(args.interval)


def cmd_monitor(args: argparse.Namespace) -> int:
    """`monitor`: sessions, table fill, SYN rate, drops by reason and alerts, live."""
    return run_client(args, lambda api: monitor(api, args, sys.stdout), 10.0)


def add_monitor_parser(subparsers: Any) -> None:
    """Register `monitor` on the `microseg` subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "monitor",
        parents=[common_parser()],
        help="the classifier under load, live: sessions, table fill, SYN rate, drops, alerts",
        description="Show the running agent's sessions, the fill of every kernel table, new and"
        " SYN sessions per second, drops by reason and the alerts firing, refreshed every"
        " --interval seconds until Ctrl-C.",
    )
    p.add_argument(
        "--interval",
        type=argtypes.monitor_interval,
        default=1.0,
        metavar="SECONDS",
        help="seconds between readings (default 1)",
    )
    p.add_argument("--once", action="store_true", help="one reading, then exit")
    p.add_argument(
        "--count",
        type=argtypes.monitor_count,
        default=0,
        metavar="N",
        help="stop after N readings (default 0: until Ctrl-C)",
    )
    p.set_defaults(func=cmd_monitor)
