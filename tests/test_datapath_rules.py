"""The classifier in the real kernel, rules: addresses, ports, protocols, direction, priority and
tie-breaks, default actions, through BPF_PROG_TEST_RUN on the session's classifier; expected
verdicts are written out by hand and also checked against the reference model
(streamer/datapath/reference.py), so both agree with contract §2."""

from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING, Any

import pytest
from support.bpf import kernel_retval as run
from support.classifier import DROP, PASS, Delta, R, expect_ref, install, pk
from support.packets import ETH_P_IP, ETH_P_IPV6, eth, frame, icmp, icmpv6, ipv4, ipv6

from streamer.datapath.datapath import Datapath
from streamer.datapath.reference import Packet, Verdict, judge, parse_frame

if TYPE_CHECKING:
    pass


# ---- addresses -----------------------------------------------------------------------------

_V4_CIDRS = [
    "0.0.0.0/0",
    "0.0.0.0/1",
    "128.0.0.0/1",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/13",
    "198.51.100.128/25",
    "203.0.113.6/31",
    "192.0.2.77",
    "255.255.255.255",
]
_V6_CIDRS = [
    "::/0",
    "8000::/1",
    "fe80::/10",
    "2001:db8::/32",
    "2001:db8:aaaa:bbbb::/64",
    "2001:db8::8000:0/97",
    "2001:db8::/127",
    "2001:db8::1",
    "::ffff:10.0.0.0/104",
]


def _probe_addresses(cidr: str) -> list[tuple[str, bool]]:
    """(address, inside) pairs: both ends, just outside each end, the other family."""
    if cidr == "any":
        return [("192.0.2.1", True), ("2001:db8::1", True), ("0.0.0.0", True), ("::", True)]
    net = ipaddress.ip_network(cidr)
    top = 2**net.max_prefixlen - 1
    first, last = int(net.network_address), int(net.broadcast_address)
    out = [(str(net.network_address), True), (str(net.broadcast_address), True)]
    if net.num_addresses > 2:
        out.append((str(net.network_address + net.num_addresses // 2 + 1), True))
    for v in (first - 1, last + 1):
        if 0 <= v <= top:
            addr = ipaddress.IPv4Address(v) if net.version == 4 else ipaddress.IPv6Address(v)
            out.append((str(addr), False))
    if net.version == 4:
        # The other family: never matched, even as an IPv4-mapped IPv6 address.
        out += [("2001:db8::5", False), (f"::ffff:{net.network_address}", False)]
    else:
        out += [("192.0.2.5", False)]
    return out


@pytest.mark.parametrize("field", ["src_ip", "dst_ip"])
@pytest.mark.parametrize("cidr", ["any", *_V4_CIDRS, *_V6_CIDRS])
def test_address_match(dp: Datapath, field: str, cidr: str) -> None:
    pol = install(dp, "deny", R(1, **{field: cidr}))
    for addr, inside in _probe_addresses(cidr):
        other = "192.0.2.200" if ":" not in addr else "2001:db8:ffff::200"
        src, dst = (addr, other) if field == "src_ip" else (other, addr)
        for direction in ("ingress", "egress"):
            pkt = pk(src, dst, "tcp", 40000, 8080, direction)
            want = PASS if inside else DROP
            assert expect_ref(pol, pkt) == want, (cidr, addr)
            assert run(dp, pkt) == want, f"{field}={cidr}: {addr} ({direction})"


def test_address_pair_and_longest_prefix_is_not_the_rule(dp: Datapath) -> None:
    """Both addresses must match; a more specific rule does not win by being specific."""
    pol = install(
        dp,
        "allow",
        R(1, src_ip="10.0.0.0/8", dst_ip="10.128.0.0/9", action="deny", priority=100),
        R(2, src_ip="10.1.2.3", dst_ip="10.200.0.1", action="allow", priority=99),
        R(3, src_ip="2001:db8::/33", dst_ip="2001:db8:8000::/33", action="deny"),
    )
    cases = [
        (pk("10.1.2.3", "10.200.0.1", "udp", 1, 2), DROP),  # rule 1 (priority) over rule 2
        (pk("10.1.2.3", "10.127.0.1", "udp", 1, 2), PASS),  # dst outside rule 1
        (pk("11.1.2.3", "10.200.0.1", "udp", 1, 2), PASS),  # src outside rule 1
        (pk("2001:db8:7fff::1", "2001:db8:8000::1", "udp", 1, 2), DROP),
        (pk("2001:db8:8000::1", "2001:db8:8000::1", "udp", 1, 2), PASS),
        (pk("2001:db8::1", "2001:db8:7fff::1", "udp", 1, 2), PASS),
    ]
    for pkt, want in cases:
        assert expect_ref(pol, pkt) == want
        assert run(dp, pkt) == want, pkt


# ---- ports ---------------------------------------------------------------------------------

_PORT_SPECS: list[int | str] = [
    22,
    1,
    65535,
    "1000-2000",
    "0-0",
    "0-1023",
    "1024-65535",
    "0-65535",
    "32767-32768",
    "443-443",
    0,
]


def _spec_range(spec: int | str) -> tuple[int, int] | None:
    if isinstance(spec, int):
        return (spec, spec) if spec else None
    lo, hi = spec.split("-")
    return int(lo), int(hi)


@pytest.mark.parametrize("protocol", ["tcp", "udp", "any"])
@pytest.mark.parametrize("field", ["src_port", "dst_port"])
@pytest.mark.parametrize("spec", _PORT_SPECS)
def test_port_match(dp: Datapath, protocol: str, field: str, spec: int | str) -> None:
    pol = install(dp, "deny", R(1, protocol=protocol, **{field: spec}))
    rng = _spec_range(spec)
    probes = {0, 1, 65534, 65535, 22, 1023, 1024}
    if rng:
        probes |= {rng[0] - 1, rng[0], rng[0] + 1, rng[1] - 1, rng[1], rng[1] + 1}
    protos = ["tcp", "udp"] if protocol == "any" else [protocol]
    for port in sorted(p for p in probes if 0 <= p <= 65535):
        for proto in protos:
            for src, dst in (("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2")):
                sport, dport = (port, 40000) if field == "src_port" else (40000, port)
                pkt = pk(src, dst, proto, sport, dport, "egress")
                want = PASS if rng is None or rng[0] <= port <= rng[1] else DROP
                assert expect_ref(pol, pkt) == want
                assert run(dp, pkt) == want, f"{protocol} {field}={spec}: {proto} port {port}"


def test_src_and_dst_port_together(dp: Datapath) -> None:
    pol = install(dp, "deny", R(1, protocol="tcp", src_port="1024-65535", dst_port="20-21"))
    cases = [
        ((1024, 20), PASS),
        ((65535, 21), PASS),
        ((1023, 20), DROP),
        ((2000, 22), DROP),
        ((2000, 19), DROP),
    ]
    for (sport, dport), want in cases:
        pkt = pk("10.0.0.1", "10.0.0.2", "tcp", sport, dport)
        assert expect_ref(pol, pkt) == want
        assert run(dp, pkt) == want, (sport, dport)


def test_port_condition_is_met_only_by_tcp_and_udp(dp: Datapath) -> None:
    """protocol any + a port: ICMP echoes (whose identifier the parser keeps as the "port"),
    GRE, SCTP (ports the parser does not read) must not match."""
    pol = install(
        dp, "deny", R(1, protocol="any", dst_port=22), R(2, protocol="any", src_port="0-65535")
    )
    sctp_header = struct.pack("!HHII", 22, 22, 0, 0)
    cases: list[tuple[Packet | bytes, str, int]] = [
        (pk("10.0.0.1", "10.0.0.2", "tcp", 5, 22), "ingress", PASS),
        (pk("10.0.0.1", "10.0.0.2", "udp", 5, 22), "ingress", PASS),
        (pk("2001:db8::1", "2001:db8::2", "tcp", 5, 22), "ingress", PASS),
        (pk("10.0.0.1", "10.0.0.2", "icmp", 22, 22), "ingress", DROP),
        (pk("2001:db8::1", "2001:db8::2", "icmpv6", 22, 22), "ingress", DROP),
        (frame(pk("10.0.0.1", "10.0.0.2", 47), payload=bytes(8)), "ingress", DROP),
        (frame(pk("10.0.0.1", "10.0.0.2", 132), payload=sctp_header), "ingress", DROP),
        (frame(pk("2001:db8::1", "2001:db8::2", 132), payload=sctp_header), "ingress", DROP),
    ]
    for what, direction, want in cases:
        data = what if isinstance(what, bytes) else frame(what)
        parsed = parse_frame(data, direction)
        assert isinstance(parsed, Packet)
        assert expect_ref(pol, parsed) == want
        assert run(dp, data, direction) == want, parsed


# ---- protocols -----------------------------------------------------------------------------


def _proto_frames() -> dict[str, bytes]:
    v4, v6 = ("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2")
    return {
        "tcp4": frame(pk(*v4, "tcp", 1000, 80)),
        "udp4": frame(pk(*v4, "udp", 1000, 53)),
        "icmp4-echo": frame(pk(*v4, "icmp", 7, 7)),
        "icmp4-unreach": frame(pk(*v4, "icmp"), icmp_type=3, payload=bytes(28)),
        "gre4": frame(pk(*v4, 47), payload=bytes(8)),
        "tcp6": frame(pk(*v6, "tcp", 1000, 80)),
        "udp6": frame(pk(*v6, "udp", 1000, 53)),
        "icmp6-echo": frame(pk(*v6, "icmpv6", 7, 7)),
        "icmp6-reply": frame(pk(*v6, "icmpv6", 7, 7), icmp_type=129),
        "icmp6-too-big": frame(pk(*v6, "icmpv6"), icmp_type=2, payload=bytes(48)),
        "gre6": frame(pk(*v6, 47), payload=bytes(8)),
    }


_PROTO_MATCHES = {
    "tcp": {"tcp4", "tcp6"},
    "udp": {"udp4", "udp6"},
    "icmp": {"icmp4-echo", "icmp4-unreach"},
    "icmpv6": {"icmp6-echo", "icmp6-reply", "icmp6-too-big"},
    "any": set(_proto_frames()),
}


@pytest.mark.parametrize("protocol", list(_PROTO_MATCHES))
def test_protocol_match(dp: Datapath, protocol: str) -> None:
    pol = install(dp, "deny", R(1, protocol=protocol))
    for name, data in _proto_frames().items():
        want = PASS if name in _PROTO_MATCHES[protocol] else DROP
        parsed = parse_frame(data, "ingress")
        assert isinstance(parsed, Packet)
        assert expect_ref(pol, parsed) == want, name
        dp.clear_sessions()
        assert run(dp, data, "ingress") == want, f"protocol {protocol}: {name}"


def test_icmp_rule_does_not_match_the_other_family(dp: Datapath) -> None:
    """ICMP (1) inside IPv6 is not `icmp`, ICMPv6 (58) inside IPv4 is not `icmpv6` (contract §2:
    a rule's protocol is ICMP for IPv4 and ICMPv6 for IPv6)."""
    pol = install(dp, "deny", R(1, protocol="icmp"), R(2, protocol="icmpv6"))
    odd = [
        eth(ipv6("2001:db8::1", "2001:db8::2", 1, icmp(8, 0, 7, 1)), ETH_P_IPV6),
        eth(ipv4("10.0.0.1", "10.0.0.2", 58, icmpv6(128, 0, 7, 1)), ETH_P_IP),
    ]
    for data in odd:
        parsed = parse_frame(data, "ingress")
        assert isinstance(parsed, Packet)
        assert expect_ref(pol, parsed) == DROP
        assert run(dp, data, "ingress") == DROP, parsed


def test_icmpv6_inside_ipv4_is_not_neighbour_discovery(dp: Datapath) -> None:
    """IPv4 protocol 58 carrying an ICMPv6 ND type must be judged (default deny: dropped),
    not passed as L2 control traffic: otherwise anyone can tunnel past a default deny."""
    pol = install(dp, "deny")
    for nd_type in (133, 134, 135, 136, 137):
        data = eth(ipv4("10.0.0.1", "10.0.0.2", 58, icmpv6(nd_type, 0, 0, 0, bytes(16))), ETH_P_IP)
        parsed = parse_frame(data, "ingress")
        assert isinstance(parsed, Packet) and judge(pol, parsed).verdict is Verdict.DENY
        delta = Delta(dp)
        assert run(dp, data, "ingress") == DROP, f"IPv4 proto 58 type {nd_type} passed"
        assert delta().get("l2_passed", 0) == 0


def test_short_payload_of_other_family_icmp_is_judged_not_a_parse_error(dp: Datapath) -> None:
    """A protocol-58 IPv4 packet (or a protocol-1 IPv6 packet) is just another protocol: its
    payload need not be an 8-byte ICMP header. Under default allow it passes."""
    pol = install(dp, "allow")
    for data in (
        eth(ipv4("10.0.0.1", "10.0.0.2", 58, b"\x80\x00\x00"), ETH_P_IP),
        eth(ipv6("2001:db8::1", "2001:db8::2", 1, b"\x08"), ETH_P_IPV6),
    ):
        parsed = parse_frame(data, "ingress")
        assert isinstance(parsed, Packet) and judge(pol, parsed).passes
        assert run(dp, data, "ingress") == PASS, parsed


# ---- direction -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule_dir", ["ingress", "egress", "any"])
def test_direction(dp: Datapath, rule_dir: str) -> None:
    pol = install(dp, "deny", R(1, direction=rule_dir, protocol="udp", dst_port=53))
    for pkt_dir in ("ingress", "egress"):
        for src, dst in (("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2")):
            pkt = pk(src, dst, "udp", 5353, 53, pkt_dir)
            want = PASS if rule_dir in ("any", pkt_dir) else DROP
            assert expect_ref(pol, pkt) == want
            dp.clear_sessions()  # the same tuple: its session would decide both directions
            assert run(dp, pkt) == want, f"rule {rule_dir}, packet {pkt_dir}"


def test_direction_is_the_program_not_the_addresses(dp: Datapath) -> None:
    """The same frame is judged differently by the ingress and egress programs."""
    install(dp, "deny", R(1, direction="egress", protocol="tcp"))
    data = frame(pk("10.0.0.1", "10.0.0.2", "tcp", 1, 2))
    assert run(dp, data, "ingress") == DROP
    dp.clear_sessions()
    assert run(dp, data, "egress") == PASS


# ---- priority and tie-breaks ---------------------------------------------------------------


def _winner(dp: Datapath) -> tuple[str, int | None]:
    (sess,) = list(dp.sessions())
    return sess.verdict, sess.rule_id


@pytest.mark.parametrize(
    ("rules", "verdict", "rule_id"),
    [
        # higher priority wins, whatever the action and however broad
        ([R(1, action="deny", priority=100), R(2, src_ip="10.1.2.3", priority=101)], "allow", 2),
        ([R(1, action="deny", priority=101), R(2, src_ip="10.1.2.3", priority=100)], "deny", 1),
        ([R(1, action="allow", priority=65535), R(2, action="deny", priority=65534)], "allow", 1),
        ([R(1, action="deny", priority=0), R(2, src_ip="10.0.0.0/8", priority=1)], "allow", 2),
        # equal priority: deny > log > allow, whatever the rule ids and specificity
        ([R(1, src_ip="10.1.2.3"), R(9, action="deny", dst_port=80)], "deny", 9),
        ([R(1, src_ip="10.1.2.3", protocol="tcp"), R(9, action="log")], "log", 9),
        (
            [R(1, action="log", dst_ip="10.9.9.9"), R(9, action="deny", src_port="1-65535")],
            "deny",
            9,
        ),
        # equal priority and action: the lowest rule_id, even if less specific
        (
            [R(9, src_ip="10.1.2.3", dst_ip="10.9.9.9", dst_port=80), R(5, src_ip="10.0.0.0/8")],
            "allow",
            5,
        ),
        ([R(4294967295, action="deny", src_ip="10.1.2.3"), R(7, action="deny")], "deny", 7),
        ([R(8, action="log", protocol="tcp"), R(3, action="log", dst_port="80-80")], "log", 3),
    ],
)
def test_priority_and_ties(
    dp: Datapath, rules: list[dict[str, Any]], verdict: str, rule_id: int
) -> None:
    pol = install(dp, "deny", *rules)
    pkt = pk("10.1.2.3", "10.9.9.9", "tcp", 40000, 80)
    ref = judge(pol, pkt)
    assert ref.rule is not None and ref.rule.rule_id == rule_id
    assert run(dp, pkt) == (DROP if verdict == "deny" else PASS)
    assert _winner(dp) == (verdict, rule_id)


def test_default_actions(dp: Datapath) -> None:
    pkt4 = pk("10.0.0.1", "10.0.0.2", "udp", 1, 2)
    pkt6 = pk("2001:db8::1", "2001:db8::2", "icmpv6", 3, 3, "egress")
    for default, want, verdict in (("allow", PASS, "allow"), ("deny", DROP, "deny")):
        install(dp, default, R(1, src_ip="192.0.2.0/24", action="log"))
        delta = Delta(dp)
        assert run(dp, pkt4) == want
        assert run(dp, pkt6) == want
        assert delta()["policy_misses"] == 2
        assert {(s.verdict, s.rule_id) for s in dp.sessions()} == {(verdict, None)}
