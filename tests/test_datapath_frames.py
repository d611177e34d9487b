"""The classifier in the real kernel, frames: ARP, neighbour discovery and link-local MLD under
default deny, malformed frames (dropped and counted), fragments and encapsulations (judged by
the inner headers), through BPF_PROG_TEST_RUN on the session's classifier; expected verdicts are
written out by hand and also checked against the reference model
(streamer/datapath/reference.py), so both agree with contract §2."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from support.bpf import kernel_retval as run
from support.classifier import DROP, PASS, Delta, R, expect_ref, install, pk
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

from streamer.datapath.datapath import Datapath
from streamer.datapath.reference import Decision, Packet, Verdict, parse_frame

if TYPE_CHECKING:
    pass


# ---- L2, malformed and fragmented traffic --------------------------------------------------


def test_arp_neighbour_discovery_and_link_local_mld_pass_under_default_deny(dp: Datapath) -> None:
    install(dp, "deny")
    target = ipaddress.IPv6Address("2001:db8::2").packed
    frames = [
        eth(arp(), ETH_P_ARP),
        eth(arp(op=2), ETH_P_ARP),
        eth(arp(), ETH_P_ARP, [(ETH_P_8021Q, 10)]),
        eth(arp(), ETH_P_ARP, [(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)]),
    ]
    for nd_type in (133, 134, 135, 136, 137):
        body = icmpv6(nd_type, 0, 0, 0, target, src="fe80::1", dst="ff02::1:ff00:2")
        frames.append(eth(ipv6("fe80::1", "ff02::1:ff00:2", 58, body, hop_limit=255), ETH_P_IPV6))
    # behind extension headers too (hop-by-hop, as MLD-style packets carry)
    frames.append(
        eth(
            ipv6("fe80::1", "ff02::1", 58, icmpv6(135, 0, 0, 0, target), ext=[hbh_ext()]),
            ETH_P_IPV6,
        )
    )
    # MLD (query, v1 report, done, v2 report) from a link-local or unspecified source, behind
    # its router-alert hop-by-hop header: ND needs it (snooping switches)
    for mld_type, src in ((130, "fe80::1"), (131, "fe80::2"), (132, "fe80::1"), (143, "::")):
        body = icmpv6(mld_type, 0, 0, 0, bytes(16), src=src, dst="ff02::16")
        frames.append(eth(ipv6(src, "ff02::16", 58, body, hop_limit=1, ext=[hbh_ext()]),
                          ETH_P_IPV6))  # fmt: skip
    delta = Delta(dp)
    for data in frames:
        for direction in ("ingress", "egress"):
            assert parse_frame(data, direction) == Decision(Verdict.PASS_L2)
            assert run(dp, data, direction) == PASS, data.hex()
    d = delta()
    assert d["l2_passed"] == 2 * len(frames)
    assert d["total_packets"] == 2 * len(frames)
    assert "new_sessions" not in d and "policy_misses" not in d
    assert list(dp.sessions()) == []
    # ICMPv6 that is not ND is judged: echo and type 138 (router renumbering) are dropped,
    # and so is MLD from a routable source (it cannot be link-scoped).
    for icmp_type, src in ((128, "fe80::1"), (138, "fe80::1"), (130, "2001:db8::1"),
                           (143, "2001:db8::1")):  # fmt: skip
        data = eth(ipv6(src, "ff02::1", 58, icmpv6(icmp_type)), ETH_P_IPV6)
        parsed = parse_frame(data, "ingress")
        assert isinstance(parsed, Packet), (icmp_type, src)
        assert run(dp, data, "ingress") == DROP, (icmp_type, src)


def _malformed_frames() -> dict[str, bytes]:
    tcp4 = ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2))
    tcp6 = ipv6("2001:db8::1", "2001:db8::2", 6, tcp(1, 2))
    # BPF_PROG_TEST_RUN refuses a frame whose outer ethertype is IPv4/IPv6 when the IP header
    # is incomplete (EINVAL): such frames go behind a VLAN tag, where the kernel does not look.
    tag = [(ETH_P_8021Q, 7)]
    return {
        "unknown ethertype (LLDP)": eth(bytes(46), 0x88CC),
        "unknown ethertype (MPLS)": eth(tcp4, 0x8847),
        "ethernet only": eth(b"", ETH_P_IP, tag),
        "truncated IPv4 header": eth(tcp4[:19], ETH_P_IP, tag),
        "IPv4 ihl 4": eth(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2), ihl=4), ETH_P_IP),
        "IPv4 ihl 0": eth(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2), ihl=0), ETH_P_IP),
        "IPv4 ihl beyond the frame": eth(ipv4("10.0.0.1", "10.0.0.2", 17, b"", ihl=15), ETH_P_IP),
        "IPv4 version 6": eth(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2), version=6), ETH_P_IP),
        "IPv4 total length < header": eth(
            ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2), total_length=19), ETH_P_IP
        ),
        "truncated TCP header": eth(tcp4[: 20 + 19], ETH_P_IP),
        "truncated UDP header": eth(ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2)[:7]), ETH_P_IP),
        "truncated ICMP header": eth(ipv4("10.0.0.1", "10.0.0.2", 1, icmp(8)[:7]), ETH_P_IP),
        "truncated IPv6 header": eth(tcp6[:39], ETH_P_IPV6, tag),
        "IPv6 version 4": eth(
            ipv6("2001:db8::1", "2001:db8::2", 6, tcp(1, 2), version=4), ETH_P_IPV6
        ),
        "truncated TCP in IPv6": eth(tcp6[: 40 + 12], ETH_P_IPV6),
        "truncated ICMPv6": eth(
            ipv6("2001:db8::1", "2001:db8::2", 58, icmpv6(135)[:6]), ETH_P_IPV6
        ),
        "truncated extension header": eth(
            ipv6("2001:db8::1", "2001:db8::2", 6, b"", ext=[hbh_ext(16)])[: 40 + 8], ETH_P_IPV6
        ),
        "9 extension headers": eth(
            ipv6("2001:db8::1", "2001:db8::2", 6, tcp(1, 2), ext=[dstopts_ext()] * 9), ETH_P_IPV6
        ),
        "3 VLAN tags": eth(tcp4, ETH_P_IP, [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)]),
        "truncated VLAN tag": eth(b"", ETH_P_8021Q)[:14] + b"\x00\x01",
    }


def test_malformed_frames_drop_and_count_parse_drops(dp: Datapath) -> None:
    install(dp, "allow")
    frames = _malformed_frames()
    delta = Delta(dp)
    for name, data in frames.items():
        assert parse_frame(data, "ingress") == parse_frame(data, "egress")
        ref = parse_frame(data, "ingress")
        assert not isinstance(ref, Packet) and ref.verdict is Verdict.DROP_PARSE, name
        assert run(dp, data, "ingress") == DROP, name
    d = delta()
    assert d.pop("parse_drops") == len(frames)
    assert d.pop("total_packets") == len(frames)
    assert d.pop("total_bytes") == sum(len(f) for f in frames.values())
    assert d == {}, "a malformed frame touched other counters"


def test_fragments(dp: Datapath) -> None:
    install(dp, "allow")
    later = [
        eth(ipv4("10.0.0.1", "10.0.0.2", 6, bytes(24), frag_offset=1), ETH_P_IP),
        eth(ipv4("10.0.0.1", "10.0.0.2", 17, bytes(24), frag_offset=100, mf=True), ETH_P_IP),
        eth(ipv6("2001:db8::1", "2001:db8::2", 6, bytes(24), ext=[frag_ext(offset=1)]), ETH_P_IPV6),
        eth(
            ipv6(
                "2001:db8::1",
                "2001:db8::2",
                17,
                bytes(24),
                ext=[hbh_ext(), frag_ext(offset=185, more=True)],
            ),
            ETH_P_IPV6,
        ),
    ]
    first = [
        eth(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2), mf=True), ETH_P_IP),
        eth(
            ipv6("2001:db8::1", "2001:db8::2", 6, tcp(1, 2), ext=[frag_ext(more=True)]), ETH_P_IPV6
        ),
    ]
    delta = Delta(dp)
    for data in later:
        ref = parse_frame(data, "ingress")
        assert not isinstance(ref, Packet) and ref.verdict is Verdict.DROP_FRAGMENT
        assert run(dp, data, "ingress") == DROP, data.hex()
    for data in first:
        assert isinstance(parse_frame(data, "ingress"), Packet)
        assert run(dp, data, "ingress") == PASS, data.hex()
    d = delta()
    assert d["fragment_drops"] == len(later)
    assert d["new_sessions"] == len(first)
    assert "parse_drops" not in d


def test_encapsulations_are_judged_by_the_inner_headers(dp: Datapath) -> None:
    """VLAN/QinQ tags, IPv4 options and IPv6 extension headers before TCP/UDP."""
    pol = install(
        dp,
        "deny",
        R(1, protocol="tcp", dst_port=443, src_ip="10.0.0.0/8"),
        R(2, protocol="udp", dst_port=53, src_ip="2001:db8::/32"),
    )
    p4 = pk("10.0.0.1", "192.0.2.1", "tcp", 1000, 443)
    p6 = pk("2001:db8::1", "2001:db9::1", "udp", 1000, 53)
    q = [(ETH_P_8021AD, 100), (ETH_P_8021Q, 200)]
    frames = [
        frame(p4, vlans=[(ETH_P_8021Q, 5)]),
        frame(p4, vlans=q),
        frame(p4, options=bytes([7, 39]) + bytes(37)),  # the longest header: ihl 15
        frame(p6, vlans=q),
        frame(p6, ext=[hbh_ext(), routing_ext(), dstopts_ext(24)]),
        frame(p6, ext=[dstopts_ext()] * 8),
        frame(p6, ext=[hbh_ext(), frag_ext(more=True)], vlans=[(ETH_P_8021Q, 9)]),
        frame(p6, ext=[ah_ext(), dstopts_ext()]),
        frame(p6, ext=[ah_ext(24)], vlans=[(ETH_P_8021Q, 9)]),
        # the L4 header as far in as the parser looks: offset 14 + 40 + 968 = 1022
        frame(p6, ext=[dstopts_ext(968)]),
    ]
    for data in frames:
        parsed = parse_frame(data, "ingress")
        assert isinstance(parsed, Packet)
        assert expect_ref(pol, parsed) == PASS
        dp.clear_sessions()
        assert run(dp, data, "ingress") == PASS, data.hex()
    # one 8-byte step further (offset 1030) is too far: dropped as unparsable
    far = frame(p6, ext=[dstopts_ext(976)])
    assert parse_frame(far, "ingress") == Decision(Verdict.DROP_PARSE)
    assert run(dp, far, "ingress") == DROP
    # the same encapsulations with a port the rules do not allow
    for data in (
        frame(pk("10.0.0.1", "192.0.2.1", "tcp", 1000, 444), vlans=q),
        frame(pk("2001:db8::1", "2001:db9::1", "udp", 1000, 54), ext=[hbh_ext(), routing_ext()]),
    ):
        dp.clear_sessions()
        assert run(dp, data, "ingress") == DROP
