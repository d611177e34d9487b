"""`microseg session list`: the agent's live sessions through its API.

In: filters (`--ip`, `--port`, `--protocol`, `--verdict`, `--limit`), applied by the agent
(GET /api/v1/sessions). Out: one row per session (both ends, direction, verdict, deciding
rule, packets and bytes each way) and a count line saying whether the agent cut the list, or
with `-o json` the answer unchanged. Exit status as for the other clients (0, 1, 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, Final

from streamer.cli import argtypes
from streamer.cli.connection import Api, common_parser, expect_dict, run_command
from streamer.cli.output import cell, format_table, list_of_dicts, print_json
from streamer.vocabulary import PROTOCOL_NUMBERS, VERDICTS

__all__ = ["add_session_parser", "cmd_session_list"]

SESSION_HEADERS: Final = (
    "PROTO",
    "SRC",
    "DST",
    "DIR",
    "VERDICT",
    "RULE",
    "PKTS_OUT",
    "BYTES_OUT",
    "PKTS_IN",
    "BYTES_IN",
)


def _endpoint_text(ip: Any, port: Any) -> str:
    addr = cell(ip)
    if port in (None, 0):
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _session_row(s: Mapping[str, Any]) -> list[str]:
    rule = s.get("rule_id")
    return [
        cell(s.get("protocol")),
        _endpoint_text(s.get("src_ip"), s.get("src_port")),
        _endpoint_text(s.get("dst_ip"), s.get("dst_port")),
        cell(s.get("direction")),
        cell(s.get("verdict")),
        "default" if rule is None else cell(rule),
        cell(s.get("packets_out", 0)),
        cell(s.get("bytes_out", 0)),
        cell(s.get("packets_in", 0)),
        cell(s.get("bytes_in", 0)),
    ]


async def _session_list(api: Api, args: argparse.Namespace) -> int:
    params = {
        k: str(v)
        for k in ("ip", "port", "protocol", "verdict", "limit")
        if (v := getattr(args, k)) is not None
    }
    data = expect_dict(await api.call("GET", "/sessions", params=params), api, "GET /sessions")
    if args.output == "json":
        print_json(data)
        return 0
    sessions = list_of_dicts(data.get("sessions"))
    if sessions:
        print(
            format_table(SESSION_HEADERS, [_session_row(s) for s in sessions], right=(6, 7, 8, 9))
        )
    count = data.get("count", len(sessions))
    line = f"{count} session{'' if count == 1 else 's'}"
    if data.get("truncated"):
        line += " (truncated: narrow the filters or raise --limit)"
    print(line)
    return 0


def cmd_session_list(args: argparse.Namespace) -> int:
    """`session list`: live sessions, filtered by the server."""
    return run_command(args, _session_list)


def add_session_parser(subparsers: Any) -> None:
    """Register `session list` on the `microseg` subparsers."""
    session: argparse.ArgumentParser = subparsers.add_parser(
        "session",
        help="the agent's live sessions",
    )
    ssub = session.add_subparsers(dest="session_command", metavar="{list}")
    ssub.required = True
    p = ssub.add_parser("list", parents=[common_parser()], help="list live sessions")
    p.add_argument("--ip", help="either end has this address")
    p.add_argument("--port", type=argtypes.port_number, help="either end has this port")
    p.add_argument("--protocol", type=str.lower, choices=list(PROTOCOL_NUMBERS))
    p.add_argument("--verdict", type=str.lower, choices=VERDICTS)
    p.add_argument("--limit", type=argtypes.limit, help="at most this many (the agent caps it too)")
    p.set_defaults(func=cmd_session_list)
