"""The session route: `/api/v1/sessions`, the kernel's session table, filtered.

In: a request's filters (`ip`, `src_ip`, `dst_ip` as addresses or CIDRs; `port`, `src_port`,
`dst_port`; `protocol`; `verdict`) and `limit` (100 by default), and the datapath's sessions. Out:
up to `limit` matching sessions as JSON (in table order) and whether more matched (`truncated`);
the rest are not read into the answer. A bad filter value is a 400.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from streamer.api.context import CTX, ApiError, json_response, short, wall_time
from streamer.api.openapi import SESSION_LIMIT_MAX
from streamer.api.params import int_param, query_params
from streamer.events.decode import PROTOCOLS, TCP_FLAG_NAMES
from streamer.vocabulary import PROTOCOL_NUMBERS, VERDICTS, Protocol

__all__ = ["sessions"]

_SESSION_PARAMS: Final = (
    "ip",
    "src_ip",
    "dst_ip",
    "port",
    "src_port",
    "dst_port",
    "protocol",
    "verdict",
    "limit",
)
_PROTOCOL_FILTER: Final[dict[str, int | None]] = {**PROTOCOL_NUMBERS, Protocol.ANY.value: None}
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _net_param(name: str, value: str) -> IPNet:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ApiError(400, f"{name}: {short(value, 60)!r} is not an IP address or CIDR") from None


def _in(net: IPNet, address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in net
    except ValueError:
        return False


_ADDRESS_FILTERS: Final = (
    ("ip", ("src_ip", "dst_ip")),
    ("src_ip", ("src_ip",)),
    ("dst_ip", ("dst_ip",)),
)
_PORT_FILTERS: Final = (
    ("port", ("src_port", "dst_port")),
    ("src_port", ("src_port",)),
    ("dst_port", ("dst_port",)),
)


def _address_check(net: IPNet, ends: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda s: any(_in(net, getattr(s, end)) for end in ends)


def _port_check(port: int, ends: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda s: any(getattr(s, end) == port for end in ends)


def _session_filter(query: dict[str, str]) -> Callable[[Any], bool]:
    """A predicate over `Session`s from the /sessions query; 400 on a bad value."""
    checks: list[Callable[[Any], bool]] = []
    for name, ends in _ADDRESS_FILTERS:
        if name in query:
            checks.append(_address_check(_net_param(name, query[name]), ends))
    for name, ends in _PORT_FILTERS:
        if name in query:
            checks.append(_port_check(int_param(name, query[name], 0, 65535), ends))
    if "protocol" in query:
        name = query["protocol"].lower()
        if name not in _PROTOCOL_FILTER:
            raise ApiError(
                400,
                f"protocol: {short(query['protocol'], 40)!r} is not one of: "
                + ", ".join(_PROTOCOL_FILTER),
            )
        number = _PROTOCOL_FILTER[name]
        if number is not None:
            checks.append(lambda s: bool(s.protocol == number))
    if "verdict" in query:
        verdict = query["verdict"].lower()
        if verdict not in VERDICTS:
            raise ApiError(
                400,
                f"verdict: {short(query['verdict'], 40)!r} is not one of: " + ", ".join(VERDICTS),
            )
        checks.append(lambda s: bool(s.verdict == verdict))
    return lambda s: all(check(s) for check in checks)


def _session_json(s: Any) -> dict[str, Any]:
    return {
        "src_ip": s.src_ip,
        "dst_ip": s.dst_ip,
        "src_port": s.src_port,
        "dst_port": s.dst_port,
        "protocol": PROTOCOLS.get(s.protocol, str(s.protocol)),
        "family": s.family,
        "direction": s.direction,
        "verdict": s.verdict,
        "rule_id": s.rule_id,
        "policy_generation": s.generation,
        "ifindex": s.ifindex,
        "first_seen": wall_time(s.first_seen_ns),
        "last_seen": wall_time(s.last_seen_ns),
        "packets_out": s.packets_out,
        "bytes_out": s.bytes_out,
        "packets_in": s.packets_in,
        "bytes_in": s.bytes_in,
        "tcp_flags": (
            "|".join(n for i, n in enumerate(TCP_FLAG_NAMES) if s.tcp_flags >> i & 1)
            if s.protocol == 6
            else None
        ),
    }


def _find_sessions(
    datapath: Any, keep: Callable[[Any], bool], limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` matching sessions, and whether more matched (one walk of the table)."""
    out: list[dict[str, Any]] = []
    for s in datapath.sessions():
        if keep(s):
            if len(out) == limit:
                return out, True
            out.append(_session_json(s))
    return out, False


async def sessions(request: web.Request) -> web.Response:
    query = query_params(request, _SESSION_PARAMS)
    limit = int_param("limit", query.get("limit", "100"), 1, SESSION_LIMIT_MAX)
    keep = _session_filter(query)
    found, truncated = await asyncio.to_thread(
        _find_sessions, request.app[CTX].datapath, keep, limit
    )
    return json_response({"sessions": found, "count": len(found), "truncated": truncated})
