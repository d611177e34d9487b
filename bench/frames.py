"""Minimal Ethernet frames for BPF_PROG_TEST_RUN, built from integers (fast for thousands).

In: family, addresses as ints, protocol, ports. Out: a frame the classifier parses
(Ethernet + IPv4/IPv6 + TCP SYN / UDP / ICMP echo). Checksums are left 0: the classifier
checks none of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamer.datapath.reference import Packet

_ETH_V4 = bytes.fromhex("0200000000020200000000010800")
_ETH_V6 = bytes.fromhex("02000000000202000000000186dd")
TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow's first packet as the classifier sees it (addresses as ints)."""

    family: int
    src: int
    dst: int
    proto: int
    sport: int
    dport: int
    direction: str  # "ingress" or "egress": which program runs it

    def packet(self) -> Packet:
        """The flow's first packet as the reference model (streamer.datapath.reference) takes
        it."""
        from streamer.datapath.reference import Packet

        addr = IPv4Address if self.family == 4 else IPv6Address
        return Packet(
            self.family,
            addr(self.src),
            addr(self.dst),
            self.proto,
            self.sport,
            self.dport,
            "ingress" if self.direction == "ingress" else "egress",
        )


def _l4(flow: Flow) -> bytes:
    if flow.proto == TCP:
        return struct.pack("!HHIIBBHHH", flow.sport, flow.dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    if flow.proto == UDP:
        return struct.pack("!HHHH", flow.sport, flow.dport, 8, 0)
    if flow.proto in (ICMP, ICMPV6):
        # An echo request: the classifier takes its identifier as both "ports".
        return struct.pack("!BBHHH", 8 if flow.proto == ICMP else 128, 0, 0, flow.sport, 0)
    return b""


def frame(flow: Flow) -> bytes:
    """The Ethernet frame carrying `flow`'s first packet."""
    l4 = _l4(flow)
    if flow.family == 4:
        ip = struct.pack(
            "!BBHHHBBHII", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, flow.proto, 0, flow.src, flow.dst
        )
        return _ETH_V4 + ip + l4
    ip = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(l4),
        flow.proto,
        64,
        flow.src.to_bytes(16, "big"),
        flow.dst.to_bytes(16, "big"),
    )
    return _ETH_V6 + ip + l4
