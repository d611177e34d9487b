"""`microseg flows observe` (the terminal view of the flow feed, like `hubble observe`) and
`microseg viewer-url` (a one-time sign-in link for the browser viewer).

In: command-line filters (`--verdict`, `--ip`, `--port`, `--protocol`, `--rule`, `--staged`,
`--staged-verdict`: contract §6), `--last N`, `--follow`, `-o table|json|compact`, and the API
address and token as for the other clients (streamer/cli/connection.py). Out: the agent's recent
records (GET /api/v1/flows/recent) and, with `--follow`, the live feed (the WebSocket at
/api/v1/flows) on stdout, one line per record; colours only when stdout is a terminal
(`--color`), never with `-o json`. `lost` records always pass the filters: a gap concerns every
view. Records already printed from the recent ones are not printed again from the feed (by
`seq`).

Filters other than a rule *name* are applied by the agent; `--rule NAME` (not a number) and
`--rule default` are applied here. `ObserveConfig.matches` applies them all here, the same way
(`microseg fleet observe`, streamer/cli/fleetobserve.py, reads Kafka, where nobody filters for
it); `add_observe_args` gives both commands the same flags. Exit status: 0 done (or Ctrl-C
while following), 1 the agent refused, could not be reached, closed the feed or dropped us as
too slow, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, Any, Final

import aiohttp

from streamer.cli import argtypes
from streamer.cli.connection import TOKEN_ENV, Api, add_connection_args, run_client, unreachable
from streamer.cli.endpoint import API_PREFIX, Endpoint
from streamer.cli.errors import ApiError, ClientError
from streamer.cli.output import format_table
from streamer.events.sinks.websocket import FlowFilter
from streamer.events.text import cells, compact_line
from streamer.vocabulary import PROTOCOL_NUMBERS, Action

__all__ = [
    "ObserveConfig",
    "Printer",
    "add_flow_parsers",
    "add_observe_args",
    "cmd_flows_observe",
    "cmd_viewer_url",
    "observe",
]

DEFAULT_LAST: Final = 20
OUTPUTS: Final = ("table", "json", "compact")
# deny first: the verdicts people watch for
VERDICTS: Final = (Action.DENY.value, Action.LOG.value, Action.ALLOW.value)
PROTOCOLS: Final = tuple(PROTOCOL_NUMBERS)
HEADERS: Final = (
    "TIME",
    "VERDICT",
    "DIRECTION",
    "SOURCE",
    "DESTINATION",
    "PROTO",
    "RULE",
    "PKTS",
    "BYTES",
    "STAGED",
)
# Column widths while following (rows cannot be measured ahead); longer values just push on.
_FOLLOW_WIDTHS: Final = (12, 7, 9, 27, 27, 6, 20, 6, 8, 0)
_RIGHT: Final = (7, 8)
# With a host column (the fleet's records), right after the time.
HOST_HEADERS: Final = (HEADERS[0], "HOST", *HEADERS[1:])
_HOST_WIDTHS: Final = (_FOLLOW_WIDTHS[0], 14, *_FOLLOW_WIDTHS[1:])
_HOST_RIGHT: Final = tuple(i + 1 for i in _RIGHT)
_COLORS: Final = {
    "deny": "\033[1;31m",
    "log": "\033[33m",
    "allow": "\033[32m",
    "lost": "\033[35m",
    "alert": "\033[1;33m",
}
_RESET: Final = "\033[0m"


def _flatten(values: list[list[str]] | None) -> list[str]:
    return list(dict.fromkeys(v for group in values or [] for v in group))


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ObserveConfig:
    """What to show. `params`: the agent's filters (query parameters); `rule_names`: rule
    names (lowercase, or "default" for the default action) matched here; `hosts`: the
    records' `host` (empty: any; only the fleet's records differ in it); `last`: recent
    records first (0: none); `follow`: then the live feed until interrupted; `host_column`:
    the table and compact lines show each record's host."""

    params: dict[str, str] = field(default_factory=dict)
    rule_names: frozenset[str] = frozenset()
    rule_ids: frozenset[int] = frozenset()
    last: int = DEFAULT_LAST
    follow: bool = False
    output: str = "table"
    color: bool = False
    hosts: frozenset[str] = frozenset()
    host_column: bool = False

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, stream: IO[str], *, host_column: bool = False
    ) -> ObserveConfig:
        """From the flags of `add_observe_args` (and `--host`, where the parser has it)."""
        params: dict[str, str] = {}
        for key in ("verdict", "ip", "port", "protocol"):
            values = _flatten(getattr(args, key))
            if values:
                params[key] = ",".join(values)
        staged = _flatten(args.staged_verdict)
        if staged:
            params["staged"] = ",".join(staged)
        elif args.staged:
            params["staged"] = "any"
        rules = _flatten(args.rule)
        ids = [r for r in rules if r.isdigit()]
        names = frozenset(r.lower() for r in rules if not r.isdigit())
        if ids and not names:
            params["rule_id"] = ",".join(ids)  # all numeric: the agent filters
        last = args.last if args.last is not None else (0 if args.follow else DEFAULT_LAST)
        if args.color == "auto":
            color = (
                stream.isatty()
                and "NO_COLOR" not in os.environ
                and (os.environ.get("TERM") != "dumb")
            )
        else:
            color = args.color == "always"
        return cls(
            params=params,
            rule_names=names,
            rule_ids=frozenset(int(i) for i in ids) if names else frozenset(),
            last=last,
            follow=args.follow,
            output=args.output,
            color=color and args.output != "json",
            hosts=frozenset(_flatten(getattr(args, "host", None))),
            host_column=host_column,
        )

    @cached_property
    def flow_filter(self) -> FlowFilter:
        """The agent's own filter for `params` (streamer.events.sinks.websocket), to apply
        them where no agent does. `params` were validated by the flags' types."""
        return FlowFilter.parse(self.params)

    def matches(self, obj: dict[str, Any]) -> bool:
        """Every filter, applied here, with the agent's semantics: `params` as the agent
        applies them (lost and alert records pass), then `keep`, then `hosts` (which applies
        to lost and alert records too: another host's gap concerns no view of this one)."""
        if self.hosts and obj.get("host") not in self.hosts:
            return False
        flt = self.flow_filter
        return (flt.any or flt.matches(obj)) and self.keep(obj)

    def keep(self, obj: Mapping[str, Any]) -> bool:
        """The filters applied here (rule names); the agent applied the rest."""
        if not self.rule_names or obj.get("type") in ("lost", "alert"):
            return True
        rule = obj.get("rule")
        if not isinstance(rule, dict):
            return "default" in self.rule_names
        name = str(rule.get("name", "")).lower()
        return name in self.rule_names or rule.get("rule_id") in self.rule_ids


# --------------------------------------------------------------------------- output


class Printer:
    """Writes records to `stream` in one of OUTPUTS; `raw` is the record's JSON text when we
    have it (printed unchanged with -o json)."""

    def __init__(self, cfg: ObserveConfig, stream: IO[str]) -> None:
        self.cfg = cfg
        self.stream = stream
        self.header_done = False
        self.count = 0
        self.headers = HOST_HEADERS if cfg.host_column else HEADERS
        self._widths = _HOST_WIDTHS if cfg.host_column else _FOLLOW_WIDTHS
        self._right = _HOST_RIGHT if cfg.host_column else _RIGHT

    def cells(self, obj: Mapping[str, Any]) -> list[str]:
        row = cells(obj)
        if self.cfg.host_column:
            row.insert(1, str(obj.get("host") or "-"))
        return row

    def _paint(self, obj: Mapping[str, Any], line: str) -> str:
        if not self.cfg.color:
            return line
        kind = obj.get("type")
        key = str(kind) if kind in ("lost", "alert") else str(obj.get("verdict", ""))
        code = _COLORS.get(key)
        return f"{code}{line}{_RESET}" if code else line

    def batch(self, records: Sequence[tuple[dict[str, Any], str | None]]) -> None:
        """Records known all at once (the recent ones): a table sized to them."""
        if self.cfg.output != "table" or self.cfg.follow:
            for obj, raw in records:
                self.one(obj, raw)
            return
        rows = [self.cells(obj) for obj, _ in records]
        text = format_table(self.headers, rows, right=self._right)
        lines = text.split("\n")
        out = [lines[0]] + [
            self._paint(obj, ln) for (obj, _), ln in zip(records, lines[1:], strict=True)
        ]
        self.stream.write("\n".join(out) + "\n")
        self.stream.flush()
        self.header_done = True
        self.count += len(records)

    def one(self, obj: dict[str, Any], raw: str | None) -> None:
        if self.cfg.output == "json":
            line = raw if raw is not None else json.dumps(obj, separators=(",", ":"))
        elif self.cfg.output == "compact":
            host = f"{obj.get('host') or '-'} " if self.cfg.host_column else ""
            line = self._paint(obj, host + compact_line(obj))
        else:
            if not self.header_done:
                self.stream.write(self._fixed(list(self.headers)) + "\n")
                self.header_done = True
            line = self._paint(obj, self._fixed(self.cells(obj)))
        self.stream.write(line + "\n")
        self.stream.flush()
        self.count += 1

    def _fixed(self, cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in self._right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, self._widths, strict=True))
        ]
        return "  ".join(parts).rstrip()


# --------------------------------------------------------------------------- observing


def _url(endpoint: Endpoint, path: str) -> Any:
    return endpoint.base_url.with_path(endpoint.base_url.path.rstrip("/") + API_PREFIX + path)


async def _recent(api: Api, cfg: ObserveConfig) -> list[dict[str, Any]]:
    # Rule names are matched here, so ask for everything the agent keeps and cut after.
    limit = argtypes.RECENT_MAX if cfg.rule_names else cfg.last
    data = await api.call("GET", "/flows/recent", params={**cfg.params, "limit": str(limit)})
    events = data.get("events") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise ClientError(
            "the agent's /flows/recent answer has no events list; is it a microseg"
            " agent of this version?"
        )
    kept = [e for e in events if isinstance(e, dict) and cfg.keep(e)]
    return kept[-cfg.last :] if cfg.last else []


async def observe(api: Api, cfg: ObserveConfig, stream: IO[str]) -> int:
    """Print the recent records, then (with `follow`) the live feed until it ends."""
    printer = Printer(cfg, stream)
    ws: aiohttp.ClientWebSocketResponse | None = None
    session = api._session
    assert session is not None
    try:
        if cfg.follow:
            # Subscribe first, then read the recent ones: nothing falls in between.
            ws = await _connect(session, api, cfg)
        last_seq = 0
        if cfg.last:
            recent = await _recent(api, cfg)
            printer.batch([(obj, None) for obj in recent])
            last_seq = max((int(o.get("seq", 0)) for o in recent), default=0)
        if ws is None:
            if not printer.count and cfg.output == "table":
                print("no matching flow events among those the agent keeps", file=sys.stderr)
            return 0
        return await _follow(ws, cfg, printer, last_seq)
    finally:
        if ws is not None:
            await ws.close()


async def _connect(
    session: aiohttp.ClientSession, api: Api, cfg: ObserveConfig
) -> aiohttp.ClientWebSocketResponse:
    url = _url(api.endpoint, "/flows").with_query(cfg.params)
    where = api.endpoint.display
    try:
        return await session.ws_connect(url, heartbeat=30.0, max_msg_size=1 << 20)
    except aiohttp.WSServerHandshakeError as e:
        if e.status == 401:
            raise ApiError(
                401,
                "unauthorized",
                f"the agent refused the token (pass --state-dir, --token or set {TOKEN_ENV})",
            ) from None
        raise ApiError(e.status, None, f"the agent refused the flow feed: {e.message}") from None
    except aiohttp.ClientConnectorError as e:
        raise ClientError(unreachable(where, e.os_error, api.endpoint)) from None
    except aiohttp.ClientError as e:
        raise ClientError(f"connecting to the flow feed at {where} failed: {e}") from None


async def _follow(
    ws: aiohttp.ClientWebSocketResponse, cfg: ObserveConfig, printer: Printer, last_seq: int
) -> int:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        try:
            obj = json.loads(msg.data)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("type") == "slow_consumer":
            print(
                f"microseg: the agent dropped this client as too slow ({obj.get('dropped')} "
                "events lost); narrow the filters or use -o json",
                file=sys.stderr,
            )
            return 1
        seq = obj.get("seq")
        if isinstance(seq, int) and seq <= last_seq:
            continue  # printed already, from the recent ones
        if cfg.keep(obj):
            printer.one(obj, msg.data)
    print(f"microseg: the agent closed the flow feed (code {ws.close_code})", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- commands


def cmd_flows_observe(args: argparse.Namespace) -> int:
    """`flows observe`: recent flow events, and with --follow the live feed."""
    cfg = ObserveConfig.from_args(args, sys.stdout)
    if not cfg.follow and cfg.last == 0:
        print("microseg: --last 0 without --follow shows nothing", file=sys.stderr)
        return 2
    return run_client(args, lambda api: observe(api, cfg, sys.stdout), 10.0)


def cmd_viewer_url(args: argparse.Namespace) -> int:
    """`viewer-url`: a new one-time sign-in link for the browser viewer."""
    endpoint: Endpoint = args.api
    if endpoint.unix_path is not None:
        print(
            "microseg viewer-url: a browser needs the agent's TCP address: --api HOST:PORT",
            file=sys.stderr,
        )
        return 2

    async def mint(api: Api) -> int:
        data = await api.call("POST", "/viewer/codes")
        path = data.get("path") if isinstance(data, dict) else None
        if not isinstance(path, str) or not path.startswith("/"):
            raise ClientError(
                "the agent's answer has no sign-in path; is it a microseg agent of this version?"
            )
        base = str(endpoint.base_url).rstrip("/")
        print(f"{base}{path}")
        minutes = int(data.get("expires_in_seconds", 0)) // 60
        print(f"(one-time link: open it once, within {minutes} min)", file=sys.stderr)
        return 0

    return run_client(args, mint, 10.0)


# --------------------------------------------------------------------------- parsers


def _connection(p: argparse.ArgumentParser) -> None:
    add_connection_args(p.add_argument_group("connection"))


def add_observe_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The filters, `-f/--follow`, `--last`, `-o` and `--color` of `flows observe` (and of
    `fleet observe`) on `p`; returns the filters' group (for more filters)."""
    g = p.add_argument_group("filters")
    g.add_argument(
        "--verdict",
        action="append",
        type=argtypes.choice_list(VERDICTS, "verdict"),
        metavar="deny|log",
    )
    g.add_argument(
        "--ip",
        action="append",
        type=argtypes.ip_list,
        metavar="ADDR|CIDR",
        help="either end is in it",
    )
    g.add_argument(
        "--port", action="append", type=argtypes.port_list, metavar="PORT", help="either end has it"
    )
    g.add_argument(
        "--protocol",
        action="append",
        type=argtypes.choice_list(PROTOCOLS, "protocol"),
        metavar="tcp|udp|icmp|icmpv6",
    )
    g.add_argument(
        "--rule",
        action="append",
        type=argtypes.rule_list,
        metavar="ID|NAME",
        help="decided by this rule (rule_id or name; 'default': the default action)",
    )
    g.add_argument(
        "--staged",
        action="store_true",
        help="only events with a staged verdict (staged rules would decide otherwise)",
    )
    g.add_argument(
        "--staged-verdict",
        action="append",
        type=argtypes.choice_list(VERDICTS, "staged verdict"),
        metavar="deny|log|allow",
        help="only events whose staged verdict is this (implies --staged)",
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing events as they arrive (Ctrl-C stops)",
    )
    p.add_argument(
        "--last",
        type=argtypes.recent_count,
        metavar="N",
        help=f"the last N recent events first (default {DEFAULT_LAST}; 0 with --follow)",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default="table",
        help="table (default), compact (one line each) or json (one object per line,"
        " as the agent sent it)",
    )
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour verdicts (auto: only on a terminal, and not with NO_COLOR)",
    )
    return g


def add_flow_parsers(subparsers: Any) -> None:
    """Register `flows observe` and `viewer-url` on the `microseg` subparsers."""
    flows: argparse.ArgumentParser = subparsers.add_parser(
        "flows",
        help="flow events of the running agent",
        description="Flow events of the running agent, through its API.",
    )
    fsub = flows.add_subparsers(dest="flows_command", metavar="{observe}")
    fsub.required = True
    p = fsub.add_parser(
        "observe",
        help="show recent flow events, or follow them live",
        description="Show the agent's recent flow events (the last 20 by default), or follow "
        "the live feed with --follow. Filters take comma-separated alternatives and may be "
        "repeated; lost records always show.",
    )
    add_observe_args(p)
    _connection(p)
    p.set_defaults(func=cmd_flows_observe)

    p = subparsers.add_parser(
        "viewer-url",
        help="a one-time sign-in link for the browser viewer",
        description="Ask the agent for a new one-time link that signs a browser in to the "
        "flow viewer (open it once, soon; it sets a session cookie).",
    )
    _connection(p)
    p.set_defaults(func=cmd_viewer_url)
