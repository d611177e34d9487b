"""A small, fast frame builder for tests (no scapy).

Every function returns bytes. Build inside out:
`eth(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1234, 80, src=..., dst=...)), ETH_P_IP)`,
or let `frame(pkt)` build a well-formed frame for a `streamer.datapath.reference.Packet`, so that
`parse_frame(frame(pkt), pkt.direction, pkt.ifindex)` gives the packet back (with `length` set
to the frame length, or exactly `pkt.length` when that is non-zero: the frame is padded).

Checksums: the IPv4 header checksum is always right; TCP/UDP/ICMPv6 checksums are right when
`src` and `dst` are given (they need the pseudo-header), else 0. The ICMP checksum is always
right. The classifier checks none of them.
Import as `from support.packets import ...` (tests/ is on sys.path under pytest).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

from streamer.datapath.reference import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    Packet,
)

__all__ = [
    "ETH_P_8021AD",
    "ETH_P_8021Q",
    "ETH_P_ARP",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "MAC_A",
    "MAC_B",
    "ah_ext",
    "arp",
    "checksum",
    "dstopts_ext",
    "eth",
    "frag_ext",
    "fragments4",
    "fragments6",
    "frame",
    "hbh_ext",
    "icmp",
    "icmpv6",
    "ipv4",
    "ipv6",
    "routing_ext",
    "tcp",
    "tcp_flag_bits",
    "udp",
]

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")

Address = str | IPv4Address | IPv6Address

_TCP_FLAGS = {
    "F": 0x01,
    "S": 0x02,
    "R": 0x04,
    "P": 0x08,
    "A": 0x10,
    "U": 0x20,
    "E": 0x40,
    "C": 0x80,
}


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr(value: Address) -> IPv4Address | IPv6Address:
    return value if not isinstance(value, str) else ipaddress.ip_address(value)


def _pseudo_checksum(src: Address, dst: Address, proto: int, segment: bytes) -> int:
    s, d = _addr(src), _addr(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(segment))
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", len(segment), proto)
    return checksum(pseudo + segment)


def _with_checksum(segment: bytes, at: int, value: int) -> bytes:
    return segment[:at] + struct.pack("!H", value) + segment[at + 2 :]


def eth(
    payload: bytes,
    ethertype: int,
    vlans: Sequence[tuple[int, int]] = (),
    *,
    src_mac: bytes = MAC_A,
    dst_mac: bytes = MAC_B,
) -> bytes:
    """An Ethernet frame; `vlans` are (tpid, vid) tags, outermost first."""
    header = dst_mac + src_mac
    for tpid, vid in vlans:
        header += struct.pack("!HH", tpid, vid & 0x0FFF)
    return header + struct.pack("!H", ethertype) + payload


def ipv4(
    src: Address,
    dst: Address,
    proto: int,
    payload: bytes,
    *,
    options: bytes = b"",
    frag_offset: int = 0,
    mf: bool = False,
    df: bool = False,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    total_length: int | None = None,
    ihl: int | None = None,
    version: int = 4,
) -> bytes:
    """An IPv4 packet. `options` are zero-padded to 4 bytes; `frag_offset` is in 8-byte units.

    `total_length`, `ihl` and `version` override the computed fields (for malformed packets).
    """
    options = options + b"\0" * (-len(options) % 4)
    header_words = 5 + len(options) // 4
    if header_words > 15:
        raise ValueError(f"IPv4 options too long: {len(options)} bytes (at most 40)")
    flags = (0x2000 if mf else 0) | (0x4000 if df else 0) | (frag_offset & 0x1FFF)
    length = header_words * 4 + len(payload) if total_length is None else total_length
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            (version << 4) | (header_words if ihl is None else ihl),
            tos,
            length,
            ident,
            flags,
            ttl,
            proto,
            0,
            _addr(src).packed,
            _addr(dst).packed,
        )
        + options
    )
    return _with_checksum(header, 10, checksum(header)) + payload


def _ext_bytes(ext_type: int, next_header: int, body: bytes) -> bytes:
    """One IPv6 extension header: `body` is what follows its first two bytes."""
    if ext_type == 44:
        if len(body) != 6:
            raise ValueError("a fragment header body is 6 bytes (use frag_ext())")
        return bytes([next_header, 0]) + body
    if ext_type == 51:
        # AH: (payload_len + 2) * 4 bytes; in IPv6 a multiple of 8.
        body = body + b"\0" * (-(len(body) + 2) % 8)
        total = len(body) + 2
        return bytes([next_header, total // 4 - 2]) + body
    # Hop-by-hop, routing, destination options: (hdr_ext_len + 1) * 8 bytes. Zero padding
    # is a run of Pad1 options, valid for the option headers.
    body = body + b"\0" * (-(len(body) + 2) % 8)
    total = len(body) + 2
    return bytes([next_header, total // 8 - 1]) + body


def hbh_ext(size: int = 8) -> tuple[int, bytes]:
    """A hop-by-hop options header of `size` bytes (a multiple of 8)."""
    return 0, b"\0" * (size - 2)


def dstopts_ext(size: int = 8) -> tuple[int, bytes]:
    """A destination options header of `size` bytes (a multiple of 8)."""
    return 60, b"\0" * (size - 2)


def routing_ext(size: int = 8, segments_left: int = 0) -> tuple[int, bytes]:
    """A routing header (type 0 layout, no addresses) of `size` bytes."""
    return 43, bytes([0, segments_left]) + b"\0" * (size - 4)


def ah_ext(size: int = 16, spi: int = 1, seq: int = 1) -> tuple[int, bytes]:
    """An authentication header of `size` bytes (a multiple of 8, at least 16)."""
    return 51, struct.pack("!HII", 0, spi, seq) + b"\0" * (size - 12)


def frag_ext(offset: int = 0, more: bool = False, ident: int = 0) -> tuple[int, bytes]:
    """A fragment header; `offset` in 8-byte units."""
    return 44, struct.pack("!HI", ((offset & 0x1FFF) << 3) | (1 if more else 0), ident)


def ipv6(
    src: Address,
    dst: Address,
    nexthdr: int,
    payload: bytes,
    *,
    ext: Sequence[tuple[int, bytes]] = (),
    hop_limit: int = 64,
    flow_label: int = 0,
    traffic_class: int = 0,
    payload_length: int | None = None,
    version: int = 6,
) -> bytes:
    """An IPv6 packet; `ext` are (type, body) extension headers, chained in order before
    `nexthdr` (see hbh_ext, routing_ext, frag_ext, ah_ext, dstopts_ext)."""
    chain = b""
    types = [ext_type for ext_type, _ in ext] + [nexthdr]
    for index, (ext_type, body) in enumerate(ext):
        chain += _ext_bytes(ext_type, types[index + 1], body)
    first = types[0]
    body = chain + payload
    length = len(body) if payload_length is None else payload_length
    header = struct.pack(
        "!IHBB16s16s",
        (version << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF),
        length,
        first,
        hop_limit,
        _addr(src).packed,
        _addr(dst).packed,
    )
    return header + body


def tcp_flag_bits(flags: str | int) -> int:
    """TCP flags as bits from letters ("SA" = SYN+ACK; F S R P A U E C) or an int."""
    if isinstance(flags, int):
        return flags
    bits = 0
    for letter in flags.upper():
        if letter not in _TCP_FLAGS:
            raise ValueError(f"unknown TCP flag {letter!r} (use F S R P A U E C)")
        bits |= _TCP_FLAGS[letter]
    return bits


def tcp(
    sport: int,
    dport: int,
    flags: str | int = "S",
    payload: bytes = b"",
    *,
    seq: int = 0,
    ack: int = 0,
    window: int = 65535,
    src: Address | None = None,
    dst: Address | None = None,
) -> bytes:
    """A TCP segment (20-byte header); checksum right when src and dst are given."""
    segment = (
        struct.pack(
            "!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, tcp_flag_bits(flags), window, 0, 0
        )
        + payload
    )
    if src is not None and dst is not None:
        segment = _with_checksum(segment, 16, _pseudo_checksum(src, dst, 6, segment))
    return segment


def udp(
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    src: Address | None = None,
    dst: Address | None = None,
) -> bytes:
    """A UDP datagram; checksum right when src and dst are given."""
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if src is not None and dst is not None:
        value = _pseudo_checksum(src, dst, 17, datagram) or 0xFFFF
        datagram = _with_checksum(datagram, 6, value)
    return datagram


def icmp(
    icmp_type: int, code: int = 0, ident: int = 0, seq: int = 0, payload: bytes = b""
) -> bytes:
    """An ICMP (IPv4) message: type, code, checksum, then ident and seq (the echo layout)."""
    message = struct.pack("!BBHHH", icmp_type, code, 0, ident, seq) + payload
    return _with_checksum(message, 2, checksum(message))


def icmpv6(
    icmp_type: int,
    code: int = 0,
    ident: int = 0,
    seq: int = 0,
    payload: bytes = b"",
    *,
    src: Address | None = None,
    dst: Address | None = None,
) -> bytes:
    """An ICMPv6 message (echo layout: ident, seq); checksum right when src/dst are given.

    For neighbour discovery put the target address in `payload` (ident/seq are the reserved
    word then).
    """
    message = struct.pack("!BBHHH", icmp_type, code, 0, ident, seq) + payload
    if src is not None and dst is not None:
        message = _with_checksum(message, 2, _pseudo_checksum(src, dst, 58, message))
    return message


def arp(
    op: int = 1,
    sender_mac: bytes = MAC_A,
    sender_ip: str = "10.0.0.1",
    target_mac: bytes = b"\0" * 6,
    target_ip: str = "10.0.0.2",
) -> bytes:
    """An ARP packet for Ethernet/IPv4 (wrap it: `eth(arp(), ETH_P_ARP)`)."""
    return (
        struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
        + sender_mac
        + IPv4Address(sender_ip).packed
        + target_mac
        + IPv4Address(target_ip).packed
    )


def frame(
    pkt: Packet,
    *,
    payload: bytes = b"",
    vlans: Sequence[tuple[int, int]] = (),
    ext: Sequence[tuple[int, bytes]] = (),
    options: bytes = b"",
    icmp_type: int | None = None,
    src_mac: bytes = MAC_A,
    dst_mac: bytes = MAC_B,
) -> bytes:
    """A well-formed Ethernet frame carrying `pkt` (ifindex and direction are not in a frame).

    TCP gets `pkt.tcp_flags`; ICMP/ICMPv6 is an echo request (or `icmp_type`) whose
    identifier is `pkt.sport` (which must equal `pkt.dport`; non-echo types need ports 0).
    Other protocols carry `payload` raw and need ports 0. `ext` (IPv6 extension headers) and
    `options` (IPv4) go into the IP header. A non-zero `pkt.length` pads the payload so the
    frame is exactly that long.
    """
    icmp_proto = (pkt.family == 4 and pkt.proto == 1) or (pkt.family == 6 and pkt.proto == 58)
    if pkt.proto not in (6, 17) and not icmp_proto and (pkt.sport or pkt.dport):
        raise ValueError(f"protocol {pkt.proto} has no ports: sport and dport must be 0")
    if pkt.family == 6 and pkt.proto in (0, 43, 44, 51, 60) and not ext:
        raise ValueError(f"protocol {pkt.proto} is an IPv6 extension header, not an L4 protocol")

    def build(body: bytes) -> bytes:
        if pkt.proto == 6:
            l4 = tcp(pkt.sport, pkt.dport, pkt.tcp_flags, body, src=pkt.src, dst=pkt.dst)
        elif pkt.proto == 17:
            l4 = udp(pkt.sport, pkt.dport, body, src=pkt.src, dst=pkt.dst)
        elif icmp_proto:
            echo = (8, 0) if pkt.family == 4 else (128, 129)
            kind = echo[0] if icmp_type is None else icmp_type
            if kind in echo:
                if pkt.sport != pkt.dport:
                    raise ValueError("an ICMP echo has one identifier: sport must equal dport")
            elif pkt.sport or pkt.dport:
                raise ValueError(f"ICMP type {kind} has no identifier: ports must be 0")
            if pkt.family == 4:
                l4 = icmp(kind, 0, pkt.sport, 0, body)
            else:
                l4 = icmpv6(kind, 0, pkt.sport, 0, body, src=pkt.src, dst=pkt.dst)
        else:
            l4 = body
        if pkt.family == 4:
            ip = ipv4(pkt.src, pkt.dst, pkt.proto, l4, options=options)
            return eth(ip, ETH_P_IP, vlans, src_mac=src_mac, dst_mac=dst_mac)
        ip = ipv6(pkt.src, pkt.dst, pkt.proto, l4, ext=ext)
        return eth(ip, ETH_P_IPV6, vlans, src_mac=src_mac, dst_mac=dst_mac)

    data = build(payload)
    if pkt.length:
        if pkt.length < len(data):
            raise ValueError(f"pkt.length {pkt.length} is shorter than the frame ({len(data)})")
        data = build(payload + b"\0" * (pkt.length - len(data)))
    return data


def _pieces(segment: bytes, size: int) -> list[tuple[int, bytes, bool]]:
    """`segment` cut into `size`-byte pieces (a multiple of 8): (offset in 8-byte units, piece,
    more fragments follow), first piece first."""
    if size % 8:
        raise ValueError("fragment size must be a multiple of 8")
    return [
        (off // 8, segment[off : off + size], off + size < len(segment))
        for off in range(0, len(segment), size)
    ]


def fragments4(
    src: Address, dst: Address, proto: int, segment: bytes, size: int = 16, ident: int = 1
) -> list[bytes]:
    """The IPv4 packets of `segment` (an L4 header and payload) cut into `size`-byte pieces
    (a multiple of 8), first fragment first."""
    return [
        ipv4(src, dst, proto, piece, frag_offset=units, mf=more, ident=ident)
        for units, piece, more in _pieces(segment, size)
    ]


def fragments6(
    src: Address,
    dst: Address,
    proto: int,
    segment: bytes,
    size: int = 16,
    ident: int = 1,
    ext: Sequence[tuple[int, bytes]] = (),
) -> list[bytes]:
    """The IPv6 packets of `segment` cut into `size`-byte pieces (a multiple of 8), each with
    `ext` (the unfragmentable headers) and a fragment header, first fragment first."""
    return [
        ipv6(src, dst, proto, piece, ext=[*ext, frag_ext(offset=units, more=more, ident=ident)])
        for units, piece, more in _pieces(segment, size)
    ]
