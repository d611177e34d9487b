"""Decode: raw ring-buffer records (struct ms_event, bpf/classifier.h) into typed events.

In: bytes copied out of the ring buffer. Out: FlowEvent. A record of the wrong size is
rejected with DecodeError (counted by the caller), never guessed at.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import dataclass

VERDICTS = {0: "allow", 1: "deny", 2: "log"}
DIRECTIONS = {1: "ingress", 2: "egress"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
KINDS = {1: "new", 2: "update"}
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


class RawEvent(ct.Structure):
    """ctypes mirror of struct ms_event; tests check it against the C header."""

    _fields_ = [
        ("ts", ct.c_uint64),
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("ifindex", ct.c_uint32),
        ("rule_id", ct.c_uint32),
        ("gen", ct.c_uint32),
        ("family", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("verdict", ct.c_uint8),
        ("src", ct.c_uint8 * 16),
        ("dst", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("tcp_flags", ct.c_uint8),
        ("kind", ct.c_uint8),
        ("pad", ct.c_uint16),
    ]


class DecodeError(ValueError):
    """A record that is not a struct ms_event."""


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """One kernel flow event, typed."""

    ts_ns: int  # CLOCK_MONOTONIC
    packets: int
    bytes: int
    ifindex: int
    rule_id: int | None
    generation: int
    family: int
    protocol: int
    direction: str
    verdict: str
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    tcp_flags: int
    kind: str

    @property
    def protocol_name(self) -> str:
        return PROTOCOLS.get(self.protocol, str(self.protocol))

    @property
    def tcp_flags_text(self) -> str | None:
        if self.protocol != 6:
            return None
        return "|".join(n for i, n in enumerate(TCP_FLAG_NAMES) if self.tcp_flags >> i & 1)


def _ip(family: int, raw: bytes) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def decode(record: bytes) -> FlowEvent:
    """One ring-buffer record into a FlowEvent; DecodeError if it is not one."""
    if len(record) != ct.sizeof(RawEvent):
        raise DecodeError(f"flow event of {len(record)} bytes, expected {ct.sizeof(RawEvent)}")
    r = RawEvent.from_buffer_copy(record)
    if r.family not in (4, 6):
        raise DecodeError(f"flow event with address family {r.family}")
    return FlowEvent(
        ts_ns=r.ts,
        packets=r.packets,
        bytes=r.bytes,
        ifindex=r.ifindex,
        rule_id=r.rule_id or None,
        generation=r.gen,
        family=r.family,
        protocol=r.proto,
        direction=DIRECTIONS.get(r.direction, "unknown"),
        verdict=VERDICTS.get(r.verdict, "unknown"),
        src_ip=_ip(r.family, bytes(r.src)),
        dst_ip=_ip(r.family, bytes(r.dst)),
        src_port=r.sport,
        dst_port=r.dport,
        tcp_flags=r.tcp_flags,
        kind=KINDS.get(r.kind, "unknown"),
    )
