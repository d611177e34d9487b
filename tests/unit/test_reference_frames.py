"""The reference model (`streamer.datapath.reference`), frames: `parse_frame` on Ethernet and
VLANs, IPv4, L4 and IPv6 with extension headers, truncated and garbage frames, and the frame
builder (support/packets.py) round trip."""

from __future__ import annotations

import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from support.packets import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ah_ext,
    arp,
    dstopts_ext,
    eth,
    frag_ext,
    frame,
    hbh_ext,
    icmp,
    icmpv6,
    ipv4,
    ipv6,
    routing_ext,
    tcp,
    udp,
)
from support.refmodel import A4, A6, B4, B6, tcp4

from streamer.datapath.reference import MAX_L4_OFFSET, Decision, Packet, Verdict, parse_frame

# --- parse_frame: Ethernet and VLANs --------------------------------------------------


def _tcp4_frame(**ip_kw: Any) -> bytes:
    return eth(ipv4(A4, B4, 6, tcp(1234, 80, "S", src=A4, dst=B4), **ip_kw), ETH_P_IP)


def test_short_ethernet() -> None:
    full = _tcp4_frame()
    for size in range(14):
        assert parse_frame(full[:size], "ingress") == Decision(Verdict.DROP_PARSE)


def test_direction_and_ifindex_are_taken() -> None:
    parsed = parse_frame(frame(tcp4()), "egress", 7)
    assert isinstance(parsed, Packet)
    assert (parsed.direction, parsed.ifindex) == ("egress", 7)
    with pytest.raises(ValueError):
        parse_frame(frame(tcp4()), "both")


@pytest.mark.parametrize(
    "vlans",
    [
        [],
        [(ETH_P_8021Q, 10)],
        [(ETH_P_8021AD, 10)],
        [(ETH_P_8021AD, 100), (ETH_P_8021Q, 10)],
        [(ETH_P_8021Q, 1), (ETH_P_8021Q, 2)],
    ],
)
def test_vlan_tags(vlans: list[tuple[int, int]]) -> None:
    pkt = tcp4()
    parsed = parse_frame(frame(pkt, vlans=vlans), "ingress")
    assert isinstance(parsed, Packet)
    assert parsed == replace(pkt, length=parsed.length)
    assert parse_frame(eth(arp(), ETH_P_ARP, vlans), "ingress") == Decision(Verdict.PASS_L2)


def test_three_vlan_tags_dropped() -> None:
    for tpids in ((ETH_P_8021Q,) * 3, (ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q)):
        vlans = [(tpid, 5) for tpid in tpids]
        assert parse_frame(frame(tcp4(), vlans=vlans), "ingress") == Decision(Verdict.DROP_PARSE)
        assert parse_frame(eth(arp(), ETH_P_ARP, vlans), "ingress") == Decision(Verdict.DROP_PARSE)


def test_truncated_vlan_tag() -> None:
    full = frame(tcp4(), vlans=[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)])
    for size in range(14, 22):
        assert parse_frame(full[:size], "ingress") == Decision(Verdict.DROP_PARSE)


def test_arp_passes_without_further_checks() -> None:
    assert parse_frame(eth(arp(), ETH_P_ARP), "ingress") == Decision(Verdict.PASS_L2)
    assert parse_frame(eth(b"", ETH_P_ARP), "egress") == Decision(Verdict.PASS_L2)


@pytest.mark.parametrize("ethertype", [0x88CC, 0x8847, 0x0842, 0x0000, 0xFFFF, 0x86DC])
def test_other_ethertypes_dropped(ethertype: int) -> None:
    assert parse_frame(eth(b"\0" * 64, ethertype), "ingress") == Decision(Verdict.DROP_PARSE)


# --- parse_frame: IPv4 ----------------------------------------------------------------


@pytest.mark.parametrize("ihl", range(5, 16))
def test_ipv4_options_every_ihl(ihl: int) -> None:
    options = bytes([1] * ((ihl - 5) * 4))  # NOPs
    data = _tcp4_frame(options=options)
    assert data[14] == 0x40 | ihl
    parsed = parse_frame(data, "ingress")
    assert isinstance(parsed, Packet)
    assert (parsed.sport, parsed.dport, parsed.proto, parsed.tcp_flags) == (1234, 80, 6, 0x02)
    assert parsed.length == len(data)
    # the same frame one byte short of its TCP header
    assert parse_frame(data[:-1], "ingress") == Decision(Verdict.DROP_PARSE)


@pytest.mark.parametrize("ihl", range(5))
def test_ipv4_ihl_below_5(ihl: int) -> None:
    assert parse_frame(_tcp4_frame(ihl=ihl), "ingress") == Decision(Verdict.DROP_PARSE)


def test_ipv4_header_beyond_frame() -> None:
    data = eth(ipv4(A4, B4, 47, b"", ihl=15), ETH_P_IP)  # says 60 bytes, has 20
    assert parse_frame(data, "ingress") == Decision(Verdict.DROP_PARSE)
    data = eth(ipv4(A4, B4, 47, b"\0" * 40, ihl=15), ETH_P_IP)
    assert isinstance(parse_frame(data, "ingress"), Packet)


@pytest.mark.parametrize("version", [0, 5, 6, 15])
def test_ipv4_wrong_version(version: int) -> None:
    assert parse_frame(_tcp4_frame(version=version), "ingress") == Decision(Verdict.DROP_PARSE)


def test_ipv4_total_length() -> None:
    assert parse_frame(_tcp4_frame(total_length=19), "ingress") == Decision(Verdict.DROP_PARSE)
    assert parse_frame(_tcp4_frame(total_length=0), "ingress") == Decision(Verdict.DROP_PARSE)
    with_options = _tcp4_frame(options=b"\1" * 8, total_length=27)
    assert parse_frame(with_options, "ingress") == Decision(Verdict.DROP_PARSE)
    # total_length >= header length is enough: the L4 header is read from the frame
    assert isinstance(parse_frame(_tcp4_frame(total_length=20), "ingress"), Packet)
    assert isinstance(parse_frame(_tcp4_frame(total_length=9000), "ingress"), Packet)


def test_ipv4_fragments() -> None:
    for offset in (1, 2, 185, 0x1FFF):
        for mf in (False, True):
            data = _tcp4_frame(frag_offset=offset, mf=mf)
            assert parse_frame(data, "ingress") == Decision(Verdict.DROP_FRAGMENT)
    # a non-first fragment carries no L4 header: dropped as a fragment, not as short
    bare = eth(ipv4(A4, B4, 6, b"xx", frag_offset=3), ETH_P_IP)
    assert parse_frame(bare, "ingress") == Decision(Verdict.DROP_FRAGMENT)
    first = parse_frame(_tcp4_frame(mf=True), "ingress")
    assert isinstance(first, Packet)
    assert first.dport == 80
    assert isinstance(parse_frame(_tcp4_frame(df=True), "ingress"), Packet)


def test_ipv4_short_header() -> None:
    full = _tcp4_frame()
    for size in range(14, 34):
        assert parse_frame(full[:size], "ingress") == Decision(Verdict.DROP_PARSE)


# --- parse_frame: L4 ------------------------------------------------------------------


def test_tcp_fields() -> None:
    data = eth(ipv4(A4, B4, 6, tcp(443, 51000, "SA")), ETH_P_IP)
    parsed = parse_frame(data, "egress")
    assert parsed == Packet.of(A4, B4, 6, 443, 51000, "egress", length=len(data), tcp_flags=0x12)


def test_udp_needs_8_bytes() -> None:
    data = eth(ipv4(A4, B4, 17, udp(53, 5353)), ETH_P_IP)
    assert parse_frame(data, "ingress") == Packet.of(A4, B4, 17, 53, 5353, length=len(data))
    for cut in range(1, 9):
        assert parse_frame(data[:-cut], "ingress") == Decision(Verdict.DROP_PARSE)


@pytest.mark.parametrize(("icmp_type", "echo"), [(8, True), (0, True), (3, False), (11, False)])
def test_icmp(icmp_type: int, echo: bool) -> None:
    data = eth(ipv4(A4, B4, 1, icmp(icmp_type, 0, ident=0x1234, seq=9)), ETH_P_IP)
    parsed = parse_frame(data, "ingress")
    ports = (0x1234, 0x1234) if echo else (0, 0)
    assert parsed == Packet.of(A4, B4, 1, *ports, length=len(data))
    assert parse_frame(data[:-1], "ingress") == Decision(Verdict.DROP_PARSE)


@pytest.mark.parametrize(
    ("icmp_type", "expected"),
    [(128, "echo"), (129, "echo"), (1, "plain"), (132, "plain"), (138, "plain"), (143, "plain")]
    + [(t, "nd") for t in range(133, 138)],
)
def test_icmpv6(icmp_type: int, expected: str) -> None:
    data = eth(ipv6(A6, B6, 58, icmpv6(icmp_type, 0, ident=77, seq=1, src=A6, dst=B6)), ETH_P_IPV6)
    parsed = parse_frame(data, "ingress")
    if expected == "nd":
        assert parsed == Decision(Verdict.PASS_L2)
    else:
        ports = (77, 77) if expected == "echo" else (0, 0)
        assert parsed == Packet.of(A6, B6, 58, *ports, length=len(data))
    assert parse_frame(data[:-1], "ingress") == Decision(Verdict.DROP_PARSE)


@pytest.mark.parametrize("icmp_type", [130, 131, 132, 143])
@pytest.mark.parametrize(("src", "passes"), [("fe80::1", True), ("::", True), (A6, False)])
def test_mld_passes_like_nd_only_when_link_scoped(icmp_type: int, src: str, passes: bool) -> None:
    data = eth(ipv6(src, "ff02::16", 58, icmpv6(icmp_type, 0, src=src, dst="ff02::16")),
               ETH_P_IPV6)  # fmt: skip
    parsed = parse_frame(data, "ingress")
    if passes:
        assert parsed == Decision(Verdict.PASS_L2)
    else:
        assert parsed == Packet.of(src, "ff02::16", 58, 0, 0, length=len(data))


def test_icmp_numbers_belong_to_their_family() -> None:
    # ICMPv6 neighbour discovery inside IPv4 is not neighbour discovery: judged, ports 0
    nd_in_v4 = eth(ipv4(A4, B4, 58, icmpv6(135, 0)), ETH_P_IP)
    assert parse_frame(nd_in_v4, "ingress") == Packet.of(A4, B4, 58, length=len(nd_in_v4))
    echo_in_v4 = eth(ipv4(A4, B4, 58, icmpv6(128, 0, ident=5)), ETH_P_IP)
    assert parse_frame(echo_in_v4, "ingress") == Packet.of(A4, B4, 58, length=len(echo_in_v4))
    # ICMP (v4) echo inside IPv6 is some other protocol: no identifier, no length rule
    echo_in_v6 = eth(ipv6(A6, B6, 1, icmp(8, 0, ident=5)), ETH_P_IPV6)
    assert parse_frame(echo_in_v6, "ingress") == Packet.of(A6, B6, 1, length=len(echo_in_v6))
    short = eth(ipv6(A6, B6, 1, b"\x08"), ETH_P_IPV6)
    assert isinstance(parse_frame(short, "ingress"), Packet)


@pytest.mark.parametrize("proto", [47, 50, 59, 132, 255, 2])
def test_other_protocols_have_no_ports(proto: int) -> None:
    for family_frame in (
        eth(ipv4(A4, B4, proto, b""), ETH_P_IP),
        eth(ipv6(A6, B6, proto, b"\1\2\3\4\5\6\7\x08"), ETH_P_IPV6),
    ):
        parsed = parse_frame(family_frame, "ingress")
        assert isinstance(parsed, Packet)
        assert (parsed.proto, parsed.sport, parsed.dport, parsed.tcp_flags) == (proto, 0, 0, 0)


# --- parse_frame: IPv6 and extension headers ------------------------------------------


def _tcp6_frame(ext: list[tuple[int, bytes]] | None = None, **kw: Any) -> bytes:
    segment = tcp(1234, 443, "S", src=A6, dst=B6)
    return eth(ipv6(A6, B6, 6, segment, ext=ext or [], **kw), ETH_P_IPV6)


def test_ipv6_plain() -> None:
    data = _tcp6_frame()
    assert parse_frame(data, "ingress") == Packet.of(
        A6, B6, 6, 1234, 443, length=len(data), tcp_flags=2
    )
    for size in range(14, 54):
        assert parse_frame(data[:size], "ingress") == Decision(Verdict.DROP_PARSE)
    for version in (4, 0, 7):
        assert parse_frame(_tcp6_frame(version=version), "ingress") == Decision(Verdict.DROP_PARSE)


EXT_CHAINS: list[list[tuple[int, bytes]]] = [
    [hbh_ext()],
    [hbh_ext(16)],
    [routing_ext()],
    [routing_ext(24, 1)],
    [dstopts_ext()],
    [dstopts_ext(64)],
    [ah_ext()],
    [ah_ext(24)],
    [frag_ext()],
    [frag_ext(0, more=True, ident=99)],
    [hbh_ext(), dstopts_ext(), routing_ext(), frag_ext(0, True), ah_ext(), dstopts_ext()],
    [dstopts_ext()] * 8,
]


@pytest.mark.parametrize("chain", EXT_CHAINS)
def test_ipv6_extension_chains(chain: list[tuple[int, bytes]]) -> None:
    data = _tcp6_frame(chain)
    parsed = parse_frame(data, "ingress")
    assert parsed == Packet.of(A6, B6, 6, 1234, 443, length=len(data), tcp_flags=2)
    # every truncation inside the extension headers or TCP header is a parse drop; behind a
    # first fragment's header it is a tiny fragment (a first that does not hold its headers)
    for size in range(54, len(data)):
        assert parse_frame(data[:size], "ingress") == _cut_verdict(data, size), size


def _cut_verdict(data: bytes, size: int) -> Decision:
    """What a TCP/IPv6 frame cut at `size` is: a tiny fragment once a first fragment's header
    (offset 0 with M) lies whole before the cut, else unparsable."""
    offset, nh = 54, data[20]
    while nh in (0, 43, 44, 51, 60) and offset + 8 <= size:
        if nh == 44 and data[offset + 3] & 1:
            return Decision(Verdict.DROP_FRAGMENT)
        length = (
            8
            if nh == 44
            else (data[offset + 1] + 2) * 4
            if nh == 51
            else (data[offset + 1] + 1) * 8
        )
        nh, offset = data[offset], offset + length
    return Decision(Verdict.DROP_PARSE)


def test_ipv6_nine_extension_headers_dropped() -> None:
    assert parse_frame(_tcp6_frame([dstopts_ext()] * 9), "ingress") == Decision(Verdict.DROP_PARSE)
    nine = [hbh_ext(), *[dstopts_ext()] * 7, frag_ext()]
    assert parse_frame(_tcp6_frame(nine), "ingress") == Decision(Verdict.DROP_PARSE)


def test_ipv6_fragments() -> None:
    for offset in (1, 100, 0x1FFF):
        for more in (False, True):
            data = _tcp6_frame([frag_ext(offset, more)])
            assert parse_frame(data, "ingress") == Decision(Verdict.DROP_FRAGMENT)
    later = _tcp6_frame([hbh_ext(), routing_ext(), frag_ext(7, True), dstopts_ext()])
    assert parse_frame(later, "ingress") == Decision(Verdict.DROP_FRAGMENT)
    # the fragment bits of the first fragment (offset 0, M set) do not drop it
    first = parse_frame(_tcp6_frame([frag_ext(0, True, 0xFFFFFFFF)]), "ingress")
    assert isinstance(first, Packet)
    # a non-first fragment whose payload is cut short is still a fragment drop
    bare = eth(ipv6(A6, B6, 6, b"", ext=[frag_ext(3)]), ETH_P_IPV6)
    assert parse_frame(bare, "ingress") == Decision(Verdict.DROP_FRAGMENT)


def test_ipv6_no_next_header() -> None:
    data = eth(ipv6(A6, B6, 59, b"", ext=[dstopts_ext()]), ETH_P_IPV6)
    assert parse_frame(data, "ingress") == Packet.of(A6, B6, 59, length=len(data))


def test_ipv6_nd_behind_extension_headers() -> None:
    ns = icmpv6(135, 0, payload=IPv6Address(B6).packed)
    data = eth(ipv6(A6, B6, 58, ns, ext=[hbh_ext()]), ETH_P_IPV6)
    assert parse_frame(data, "ingress") == Decision(Verdict.PASS_L2)


def test_l4_offset_limit() -> None:
    # headers up to MAX_L4_OFFSET are parsed; past it the frame is a parse drop
    big = (MAX_L4_OFFSET - 14 - 40) // 8 * 8
    data = _tcp6_frame([hbh_ext(big)])
    assert 14 + 40 + big <= MAX_L4_OFFSET
    assert isinstance(parse_frame(data, "ingress"), Packet)
    data = _tcp6_frame([hbh_ext(big + 8)])
    assert 14 + 40 + big + 8 > MAX_L4_OFFSET
    assert parse_frame(data, "ingress") == Decision(Verdict.DROP_PARSE)
    # also when the next header behind the limit is a fragment header or another protocol
    data = eth(ipv6(A6, B6, 47, b"", ext=[hbh_ext(big + 8), frag_ext(5)]), ETH_P_IPV6)
    assert parse_frame(data, "ingress") == Decision(Verdict.DROP_PARSE)
    data = eth(ipv6(A6, B6, 47, b"", ext=[hbh_ext(big + 8)]), ETH_P_IPV6)
    assert parse_frame(data, "ingress") == Decision(Verdict.DROP_PARSE)


# --- truncation and robustness --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        _tcp4_frame(),
        _tcp4_frame(options=b"\1" * 40),
        frame(tcp4(), vlans=[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)]),
        _tcp6_frame(),
        _tcp6_frame([hbh_ext(), frag_ext(0, True), dstopts_ext(16)]),
    ],
    ids=["v4", "v4-options", "v4-qinq", "v6", "v6-ext"],
)
def test_truncated_tcp_frames(data: bytes) -> None:
    """Every cut of a TCP frame without payload is DROP_PARSE (DROP_FRAGMENT behind a first
    fragment's header), never a Packet."""
    assert isinstance(parse_frame(data, "ingress"), Packet)
    for size in range(len(data)):
        want = (
            _cut_verdict(data, size) if data[12:14] == b"\x86\xdd" else Decision(Verdict.DROP_PARSE)
        )
        assert parse_frame(data[:size], "ingress") == want, size


def test_truncated_payload_keeps_fields() -> None:
    pkt = tcp4(tcp_flags=0x18)
    data = frame(pkt, payload=b"x" * 100)
    for size in range(len(data) - 100, len(data) + 1):
        assert parse_frame(data[:size], "ingress") == replace(pkt, length=size)


def test_parser_never_raises_on_garbage() -> None:
    rng = random.Random(3)
    seeds = [
        _tcp4_frame(options=b"\1" * 12),
        _tcp6_frame([hbh_ext(), frag_ext(0, True), ah_ext()]),
        frame(Packet.of(A6, B6, "icmpv6", 3, 3), vlans=[(ETH_P_8021Q, 3)]),
        eth(arp(), ETH_P_ARP),
    ]
    for _ in range(4000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randrange(len(data) + 1)]
        result = parse_frame(bytes(data), "ingress")
        assert isinstance(result, Packet | Decision)
        if isinstance(result, Packet):
            assert result.length == len(data)


# --- frame builder round trip ---------------------------------------------------------


def _random_packet(rng: random.Random) -> Packet:
    family = rng.choice([4, 6])
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    if family == 4:
        src = IPv4Address(rng.getrandbits(32))
        dst = IPv4Address(rng.getrandbits(32))
    else:
        src = IPv6Address(rng.getrandbits(128))
        dst = IPv6Address(rng.getrandbits(128))
    proto = rng.choice([6, 17, 1 if family == 4 else 58, 47, 132])
    sport = dport = 0
    if proto in (6, 17):
        sport, dport = rng.randrange(65536), rng.randrange(65536)
    elif proto in (1, 58) and rng.random() < 0.8:
        sport = dport = rng.randrange(65536)
    return Packet(
        family,
        src,
        dst,
        proto,
        sport,
        dport,
        rng.choice(["ingress", "egress"]),
        rng.randrange(1, 100),
        rng.choice([0, 0, 200, 1500]),
        rng.randrange(256) if proto == 6 else 0,
    )


def test_frame_round_trip() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        pkt = _random_packet(rng)
        vlans = rng.choice([[], [(ETH_P_8021Q, 7)], [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)]])
        kw: dict[str, Any] = {"vlans": vlans}
        if pkt.family == 6 and rng.random() < 0.5:
            kw["ext"] = rng.choice(EXT_CHAINS[:-1])
        if pkt.family == 4 and rng.random() < 0.3:
            kw["options"] = b"\1" * rng.choice([4, 8, 40])
        if pkt.proto in (1, 58) and pkt.sport == 0:
            kw["icmp_type"] = 3 if pkt.family == 4 else 1
        data = frame(pkt, **kw)
        if pkt.length:
            assert len(data) == pkt.length
        expected = pkt if pkt.length else replace(pkt, length=len(data))
        assert parse_frame(data, pkt.direction, pkt.ifindex) == expected


def test_frame_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError):
        frame(Packet.of(A4, B4, 47, 1, 2))
    with pytest.raises(ValueError):
        frame(Packet.of(A4, B4, "icmp", 1, 2))
    with pytest.raises(ValueError):
        frame(Packet.of(A6, B6, 44))
    with pytest.raises(ValueError):
        frame(tcp4(length=20))


def test_checksums() -> None:
    from support.packets import checksum

    segment = tcp(1, 2, "PA", b"hello", src=A4, dst=B4)
    pseudo = IPv4Address(A4).packed + IPv4Address(B4).packed + bytes([0, 6, 0, len(segment)])
    assert checksum(pseudo + segment) == 0
    datagram = udp(1, 2, b"abc", src=A6, dst=B6)
    pseudo6 = (
        IPv6Address(A6).packed + IPv6Address(B6).packed + len(datagram).to_bytes(4, "big")
    ) + bytes([0, 0, 0, 17])
    assert checksum(pseudo6 + datagram) == 0
    header = ipv4(A4, B4, 6, b"", options=b"\1" * 4)[:24]
    assert checksum(header) == 0
    assert checksum(icmp(8, 0, 1, 2, b"xyz")) == 0
