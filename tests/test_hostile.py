"""A hostile corpus through BPF_PROG_TEST_RUN, each verdict equal to the reference model's:
every IPv4 header length, IPv6 extension chains of every kind and length (and one too many),
VLAN/QinQ (and one tag too many), fragments in order, out of order, missing their first,
overlapping, tiny, and firsts of other ports reusing an ID; ICMP errors quoting allowed, denied,
unknown and misdirected flows; TCP flag sequences; and every frame truncated at every byte.
A packet the model cannot judge must be a counted drop in the kernel too (`diffkit`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest
from support.diffkit import Harness
from support.packets import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    ah_ext,
    dstopts_ext,
    eth,
    frag_ext,
    fragments4,
    fragments6,
    hbh_ext,
    icmp,
    icmpv6,
    ipv4,
    ipv6,
    routing_ext,
    tcp,
    udp,
)

from streamer.datapath.datapath import Datapath
from streamer.datapath.reference import Verdict
from streamer.policy.model import PolicySet, parse_policy_document

A4, B4 = "10.1.0.1", "10.2.0.2"
A6, B6 = "2001:db8:1::1", "2001:db8:2::2"


def hostile_policy() -> PolicySet:
    """Default deny; web and DNS allowed, SSH denied above all, a UDP range logged."""
    return parse_policy_document(
        {
            "default_action": "deny",
            "policies": [
                {"rule_id": 1, "protocol": "tcp", "dst_port": 80, "action": "allow"},
                {"rule_id": 2, "protocol": "udp", "dst_port": 53, "action": "allow"},
                {
                    "rule_id": 3,
                    "protocol": "tcp",
                    "dst_port": 22,
                    "action": "deny",
                    "priority": 200,
                },
                {"rule_id": 4, "protocol": "udp", "dst_port": "5000-5100", "action": "log"},
                {"rule_id": 5, "protocol": "icmp", "src_ip": "10.9.0.0/16", "action": "allow"},
            ],
        }
    )


@pytest.fixture
def harness(datapath: Datapath) -> Iterator[Harness]:
    h = Harness(datapath, hostile_policy())
    try:
        yield h
    finally:
        h.close()


def _l4(proto: int, sport: int, dport: int, src: str, dst: str, payload: bytes = b"") -> bytes:
    if proto == 6:
        return tcp(sport, dport, "S", payload, src=src, dst=dst)
    return udp(sport, dport, payload, src=src, dst=dst)


# The flows the corpus is built from: (proto, sport, dport) judged allow, deny, log, default.
FLOWS = [(6, 40000, 80), (6, 40001, 22), (17, 40002, 53), (17, 40003, 5050), (17, 40004, 9)]


def _v4(proto: int, sport: int, dport: int, payload: bytes = b"", **kw: object) -> bytes:
    seg = _l4(proto, sport, dport, A4, B4, payload)
    return eth(ipv4(A4, B4, proto, seg, **kw), ETH_P_IP)  # type: ignore[arg-type]


def _v6(proto: int, sport: int, dport: int, payload: bytes = b"", **kw: object) -> bytes:
    seg = _l4(proto, sport, dport, A6, B6, payload)
    return eth(ipv6(A6, B6, proto, seg, **kw), ETH_P_IPV6)  # type: ignore[arg-type]


def test_every_ipv4_header_length(harness: Harness) -> None:
    for proto, sport, dport in FLOWS:
        for words in range(5, 16):
            options = bytes([1] * ((words - 5) * 4))  # NOPs
            harness.send(_v4(proto, sport, dport, options=options), "ingress")
            # the same flow's reply, options of another length
            seg = _l4(proto, dport, sport, B4, A4)
            reply = ipv4(B4, A4, proto, seg, options=bytes([1] * ((20 - words) % 11 * 4)))
            harness.send(eth(reply, ETH_P_IP), "egress")
        for ihl in range(0, 5):  # below the minimum: unparsable
            harness.send(_v4(proto, sport + 100, dport, ihl=ihl), "ingress")
        # a header length beyond the frame, a total length below the header
        harness.send(_v4(proto, sport + 200, dport, ihl=15)[:40], "ingress")
        harness.send(_v4(proto, sport + 300, dport, total_length=19), "ingress")
    harness.check("IPv4 header lengths")


def _chains() -> Iterator[list[tuple[int, bytes]]]:
    kinds: list[Callable[[int], tuple[int, bytes]]] = [
        lambda n: hbh_ext(8 * n),
        lambda n: routing_ext(8 * n),
        lambda n: dstopts_ext(8 * n),
        lambda n: ah_ext(8 * max(2, n)),
        lambda n: frag_ext(),  # atomic: offset 0, no M
    ]
    for make in kinds:
        for n in (1, 2, 3, 8, 32):
            yield [make(n)]
    for count in range(1, 10):  # 9 is one more than the classifier walks
        yield [kinds[i % len(kinds)](1 + i % 3) for i in range(count)]
    yield [dstopts_ext(968)]  # the L4 header at the furthest offset looked at
    yield [dstopts_ext(976)]  # one step beyond


def test_ipv6_extension_chains(harness: Harness) -> None:
    seen = set()
    for chain in _chains():
        for proto, sport, dport in FLOWS:
            want = harness.send(_v6(proto, sport, dport, ext=chain), "ingress")
            seen.add(want.verdict)
            seg = _l4(proto, dport, sport, B6, A6)
            harness.send(eth(ipv6(B6, A6, proto, seg, ext=chain[::-1]), ETH_P_IPV6), "egress")
        harness.dp.clear_sessions()
        harness.ref.clear_sessions()
    assert {Verdict.ALLOW, Verdict.DENY, Verdict.LOG, Verdict.DROP_PARSE} <= seen
    harness.check("IPv6 extension chains")


def test_vlan_and_qinq(harness: Harness) -> None:
    tag_sets = [
        [(ETH_P_8021Q, 10)],
        [(ETH_P_8021AD, 10)],
        [(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)],
        [(ETH_P_8021Q, 10), (ETH_P_8021Q, 20)],
        [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)],  # one too many
    ]
    for tags in tag_sets:
        for proto, sport, dport in FLOWS:
            ip4 = ipv4(A4, B4, proto, _l4(proto, sport, dport, A4, B4))
            harness.send(eth(ip4, ETH_P_IP, tags), "ingress")
            ip6 = ipv6(A6, B6, proto, _l4(proto, sport, dport, A6, B6))
            harness.send(eth(ip6, ETH_P_IPV6, tags), "egress")
        harness.dp.clear_sessions()
        harness.ref.clear_sessions()
    harness.check("VLAN tags")


def _frag_sets() -> Iterator[tuple[str, list[bytes]]]:
    """(name, frames) of fragmented datagrams of every flow, both families, each datagram
    with an identification of its own."""
    ident = 100
    for proto, sport, dport in FLOWS:
        payload = bytes(range(48))
        seg4 = _l4(proto, sport, dport, A4, B4, payload)
        seg6 = _l4(proto, sport, dport, A6, B6, payload)
        for order in ("in order", "out of order", "last first", "first missing"):
            ident += 1
            v4 = [eth(f, ETH_P_IP) for f in fragments4(A4, B4, proto, seg4, 24, ident)]
            v6 = [eth(f, ETH_P_IPV6) for f in fragments6(A6, B6, proto, seg6, 24, ident)]
            ext = [hbh_ext(), routing_ext()]
            v6x = [eth(f, ETH_P_IPV6) for f in fragments6(A6, B6, proto, seg6, 16, ident, ext=ext)]
            for fam, frags in (("v4", v4), ("v6", v6), ("v6+ext", v6x)):
                name = f"{fam} {proto}/{dport} {order}"
                if order == "in order":
                    yield name, frags
                elif order == "out of order":
                    yield name, [frags[0], *frags[:0:-1]]
                elif order == "last first":
                    yield name, [*frags[1:], frags[0]]
                else:
                    yield name, frags[1:]


def test_fragments(harness: Harness) -> None:
    for name, frames in _frag_sets():
        for f in frames:
            harness.send(f, "ingress")
        harness.check(f"fragments, {name}")
    c = harness.ref.counters
    assert c["fragments_followed"] and c["fragment_drops_no_first"] and c["fragments_first"]


def test_overlapping_and_tiny_fragments(harness: Harness) -> None:
    for proto, sport, dport in FLOWS:
        seg = _l4(proto, sport, dport, A4, B4, bytes(40))
        # tiny: the first fragment stops inside the L4 header (8 bytes of TCP)
        tiny = ipv4(A4, B4, proto, seg[:8], mf=True, ident=7)
        harness.send(eth(tiny, ETH_P_IP), "ingress")
        rest = ipv4(A4, B4, proto, seg[8:], frag_offset=1, ident=7)
        harness.send(eth(rest, ETH_P_IP), "ingress")
        # a first fragment, then one at offset 8 rewriting the TCP flags / UDP payload start
        first = ipv4(A4, B4, proto, seg[:24], mf=True, ident=8)
        harness.send(eth(first, ETH_P_IP), "ingress")
        over = ipv4(A4, B4, proto, seg[8:24], frag_offset=1, mf=True, ident=8)
        harness.send(eth(over, ETH_P_IP), "ingress")
        # a second first fragment with other ports (the denied SSH port), judged by its own
        # header, then the first again (a retransmission): the later fragment follows the newest
        other = _l4(proto, sport, 22, A4, B4, bytes(40))
        harness.send(eth(ipv4(A4, B4, proto, other[:24], mf=True, ident=8), ETH_P_IP), "ingress")
        harness.send(eth(first, ETH_P_IP), "ingress")
        harness.send(
            eth(ipv4(A4, B4, proto, seg[24:], frag_offset=3, ident=8), ETH_P_IP), "ingress"
        )
        # IPv6: tiny first fragment, and a destination-options header inside the first
        seg6 = _l4(proto, sport, dport, A6, B6, bytes(40))
        t6 = ipv6(A6, B6, proto, seg6[:8], ext=[frag_ext(more=True, ident=9)])
        harness.send(eth(t6, ETH_P_IPV6), "ingress")
        # the fragmentable part: a 16-byte destination-options header, then the L4 header
        dest = bytes([proto, 1]) + bytes(14)
        d6 = ipv6(A6, B6, 60, dest + seg6[:24], ext=[frag_ext(more=True, ident=10)])
        harness.send(eth(d6, ETH_P_IPV6), "ingress")
        o6 = ipv6(A6, B6, 60, bytes(16), ext=[frag_ext(offset=2, more=True, ident=10)])
        harness.send(eth(o6, ETH_P_IPV6), "ingress")  # offset 16 hides the L4 header end
        l6 = ipv6(A6, B6, 60, bytes(16), ext=[frag_ext(offset=5, ident=10)])
        harness.send(eth(l6, ETH_P_IPV6), "ingress")
    harness.check("overlapping and tiny fragments")
    c = harness.ref.counters
    assert c["fragment_drops_tiny"] and c["fragment_drops_overlap"]


def _icmp_error4(
    outer_src: str, outer_dst: str, inner: bytes, kind: int = 3, code: int = 4
) -> bytes:
    return eth(ipv4(outer_src, outer_dst, 1, icmp(kind, code, 0, 1400, inner[:28])), ETH_P_IP)


def _icmp_error6(outer_src: str, outer_dst: str, inner: bytes, kind: int = 2) -> bytes:
    msg = icmpv6(kind, 0, 0, 1280, inner[:48], src=outer_src, dst=outer_dst)
    return eth(ipv6(outer_src, outer_dst, 58, msg), ETH_P_IPV6)


def test_related_icmp_errors(harness: Harness) -> None:
    router4, router6 = "10.5.5.5", "2001:db8:5::5"
    for proto, sport, dport in FLOWS:
        out4 = ipv4(A4, B4, proto, _l4(proto, sport, dport, A4, B4))
        out6 = ipv6(A6, B6, proto, _l4(proto, sport, dport, A6, B6))
        # before the flow exists: judged by the policy (default deny)
        harness.send(_icmp_error4(router4, A4, out4), "ingress")
        harness.send(_icmp_error6(router6, A6, out6), "ingress")
        harness.send(eth(out4, ETH_P_IP), "egress")
        harness.send(eth(out6, ETH_P_IPV6), "egress")
        for kind, code in ((3, 4), (3, 3), (11, 0), (12, 0), (5, 1)):
            harness.send(_icmp_error4(router4, A4, out4, kind, code), "ingress")
        for kind in (1, 2, 3, 4):
            harness.send(_icmp_error6(router6, A6, out6, kind), "ingress")
        # sent to the wrong host (not the quoted packet's sender), quote cut short
        harness.send(_icmp_error4(router4, "10.3.3.3", out4), "ingress")
        harness.send(_icmp_error6(router6, "2001:db8:3::3", out6), "ingress")
        harness.send(eth(ipv4(router4, A4, 1, icmp(3, 4, 0, 0, out4[:24])), ETH_P_IP), "ingress")
        # the error about the flow from the other end (our stack answering the peer)
        back4 = ipv4(B4, A4, proto, _l4(proto, dport, sport, B4, A4))
        harness.send(_icmp_error4(A4, B4, back4), "egress")
        # an echo quoted in an error
        ping = ipv4(A4, B4, 1, icmp(8, 0, 77, 1))
        harness.send(eth(ping, ETH_P_IP), "egress")
        harness.send(_icmp_error4(router4, A4, ping, 11, 0), "ingress")
    harness.check("related ICMP errors")
    assert harness.ref.counters["related_passed"]


def test_tcp_flag_sequences(harness: Harness) -> None:
    seqs = ["S", "SA", "A", "PA", "FA", "A", "FA", "A", "S"]
    for proto, sport, dport in FLOWS:
        if proto != 6:
            continue
        for flags_out, flags_in in [
            ("S", "SA"),
            ("S", "R"),
            ("A", "A"),
            ("", "F"),
            ("FSRPAUEC", ""),
        ]:
            harness.send(eth(ipv4(A4, B4, 6, tcp(sport, dport, flags_out)), ETH_P_IP), "egress")
            harness.send(eth(ipv4(B4, A4, 6, tcp(dport, sport, flags_in)), ETH_P_IP), "ingress")
        for i, f in enumerate(seqs):
            if i % 2:
                harness.send(eth(ipv6(B6, A6, 6, tcp(dport, sport, f)), ETH_P_IPV6), "ingress")
            else:
                harness.send(eth(ipv6(A6, B6, 6, tcp(sport, dport, f)), ETH_P_IPV6), "egress")
    harness.check("TCP flag sequences")


def _truncation_bases() -> list[tuple[bytes, str]]:
    seg = tcp(40000, 80, "S", b"x" * 8, src=A4, dst=B4)
    bases = [
        (_v4(6, 40000, 80, b"hello", options=bytes([1] * 8)), "ingress"),
        (
            eth(ipv4(A4, B4, 6, tcp(40000, 80)), ETH_P_IP, [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)]),
            "ingress",
        ),
        (_v6(17, 40002, 53, b"q", ext=[hbh_ext(), dstopts_ext(16), ah_ext()]), "egress"),
        (eth(fragments4(A4, B4, 6, seg, 24, 3)[0], ETH_P_IP), "ingress"),
        (eth(fragments6(A6, B6, 6, seg, 24, 3)[0], ETH_P_IPV6), "ingress"),
        (_icmp_error4("10.5.5.5", A4, ipv4(A4, B4, 6, tcp(40000, 80))), "ingress"),
        (_icmp_error6("2001:db8:5::5", A6, ipv6(A6, B6, 17, udp(40002, 53))), "ingress"),
    ]
    return bases


def test_truncated_at_every_offset(harness: Harness) -> None:
    for data, direction in _truncation_bases():
        for cut in range(len(data) + 1):
            harness.send(data[:cut], direction)
            # and a frame that says it is longer than it is: padding after a short IP length
        harness.dp.clear_sessions()
        harness.dp.clear_fragments()
        harness.ref.clear_sessions()
        harness.ref.frags.clear()
    harness.check("truncation")


def test_tiny_frames_and_garbage(harness: Harness) -> None:
    for n in range(0, 64):
        harness.send(bytes([0x45]) * n, "ingress")
        harness.send(struct.pack("!6s6sH", b"\1" * 6, b"\2" * 6, ETH_P_IPV6) + bytes(n), "egress")
        harness.send(
            struct.pack("!6s6sH", b"\1" * 6, b"\2" * 6, ETH_P_IP) + bytes([0x4F]) * n, "ingress"
        )
    harness.check("garbage")
