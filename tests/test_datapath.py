"""The classifier in the real kernel, through BPF_PROG_TEST_RUN: verdicts on crafted frames for
every policy field, L2 and malformed traffic, sessions and re-judging, counters, atomic
apply, flow events and pinned-state adoption. Expected verdicts are written out by hand and
also checked against the reference model (streamer/datapath/reference.py), so both agree
with SPEC §2.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support.bpf import loaded_datapath
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

from streamer.datapath.attach import detach, tcx_programs
from streamer.datapath.bindings import test_run as bpf_test_run
from streamer.datapath.compiler import (
    CompiledPolicy,
    compile_policy,
    pack_rule_key,
    pack_rule_val,
    pack_shape,
)
from streamer.datapath.config import DatapathConfig, DatapathError
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.layout import (
    EVENT,
    FRAG_KEY,
    FRAG_VAL,
    REAPED,
    SESS_KEY,
    SESS_VAL,
    SETTINGS,
    TC_ACT_OK,
    TC_ACT_SHOT,
)
from streamer.datapath.maps import KeysLeft
from streamer.datapath.reference import (
    Decision,
    Packet,
    StatefulReference,
    Verdict,
    judge,
    parse_frame,
)
from streamer.datapath.tables import RuleCounters
from streamer.policy.model import PolicySet, parse_policy_document

if TYPE_CHECKING:
    from support.bpf import EventSink

    from streamer.lab.lab import Lab

PASS = TC_ACT_OK
DROP = TC_ACT_SHOT

def R(rule_id: int, **fields: Any) -> dict[str, Any]:
    """A rule document: protocol any and action allow unless given."""
    return {"rule_id": rule_id, "protocol": "any", "action": "allow", **fields}


def pk(
    src: str,
    dst: str,
    proto: int | str = "tcp",
    sport: int = 0,
    dport: int = 0,
    direction: str = "ingress",
    **kw: int,
) -> Packet:
    return Packet.of(src, dst, proto, sport, dport, direction, **kw)  # type: ignore[arg-type]


def run(dp: Datapath, what: Packet | bytes, direction: str | None = None) -> int:
    """The TC action for one packet (built by packets.frame) or raw frame."""
    if isinstance(what, Packet):
        data = frame(what)
        direction = direction or what.direction
    else:
        data = what
    assert direction in ("ingress", "egress")
    return bpf_test_run(prog_fd(dp, direction), data)[0]


def install(dp: Datapath, default: str, *rules: dict[str, Any]) -> PolicySet:
    """Apply a policy set and forget every session: the next packet of any flow is new."""
    pol = parse_policy_document({"default_action": default, "policies": list(rules)})
    dp.apply(compile_policy(pol, dp.config.max_shapes))
    dp.clear_sessions()
    return pol


def expect_ref(pol: PolicySet, pkt: Packet) -> int:
    """The TC action the reference model gives a new flow."""
    return PASS if judge(pol, pkt).passes else DROP


def _pb(counters: RuleCounters) -> tuple[int, int]:
    return counters.packets, counters.bytes


class Delta:
    """Counter changes since construction (only those that changed)."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.before = dp.counters()

    def __call__(self) -> dict[str, int]:
        now = self.dp.counters()
        return {
            k: now[k] - self.before[k]
            for k in now
            if now[k] != self.before[k] and k != "shape_probes"
        }


@pytest.fixture
def dp(datapath: Datapath) -> Datapath:
    datapath.clear_sessions()
    return datapath


# ---- layout --------------------------------------------------------------------------------


def test_map_layouts_match_python_packing(dp: Datapath) -> None:
    """The maps as bcc compiled them (bpf/classifier.h) against streamer's struct packing."""
    bpf = dp._bpf
    assert ct.sizeof(bpf["sessions"].Key) == SESS_KEY.size
    assert ct.sizeof(bpf["sessions"].Leaf) == SESS_VAL.size
    leaf = bpf["sessions"].Leaf
    # the offsets streamer reads, and the cache-line split by writer (see struct ms_sess_val)
    assert leaf.last_seen.offset == SESS_VAL.offset("last_seen")
    assert leaf.tcp_state.offset == SESS_VAL.offset("tcp_state")
    assert leaf.tclass.offset == SESS_VAL.offset("tclass")
    assert leaf.pkts_orig.offset == 32 and leaf.pkts_reply.offset == 96
    assert ct.sizeof(bpf["rules4"].Key) == len(pack_rule_key(4, 0, (1, 6, 0, 0, 0, 0))) == 16
    assert ct.sizeof(bpf["rules6"].Key) == len(pack_rule_key(6, 0, (1, 6, 0, 0, 0, 0))) == 40
    pol = parse_policy_document({"policies": [R(1)]})
    c = compile_policy(pol, 8)
    entry = next(iter(c.v4.entries[0].values()))
    assert ct.sizeof(bpf["rules4"].Leaf) == ct.sizeof(bpf["rules6"].Leaf)
    assert ct.sizeof(bpf["rules4"].Leaf) == len(pack_rule_val(entry, 1))
    assert ct.sizeof(bpf["shapes"].Leaf) == len(pack_shape(c.v4.shapes[0], 1)) == 56
    assert ct.sizeof(bpf["banks"].Leaf) == 16
    assert ct.sizeof(bpf["rule_stats"].sLeaf) == 24
    assert ct.sizeof(bpf["counters"].sLeaf) == 48 * 8
    assert ct.sizeof(bpf["frags"].Key) == FRAG_KEY.size
    assert ct.sizeof(bpf["frags"].Leaf) == FRAG_VAL.size
    assert ct.sizeof(bpf["reaped"].Leaf) == REAPED.size
    assert ct.sizeof(bpf["settings"].Leaf) == SETTINGS.size
    assert EVENT.size == 80


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
    """ICMP (1) inside IPv6 is not `icmp`, ICMPv6 (58) inside IPv4 is not `icmpv6` (SPEC §2:
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


# ---- sessions ------------------------------------------------------------------------------

FLOW = pk("10.0.0.1", "192.0.2.1", "tcp", 5555, 80, "egress")


def test_reply_to_allowed_flow_passes_under_default_deny(dp: Datapath) -> None:
    pol = install(dp, "deny", R(1, direction="egress", protocol="tcp", dst_port=80))
    reply = FLOW.reply()
    assert judge(pol, reply).verdict is Verdict.DENY  # alone, the reply would be dropped
    assert run(dp, reply) == DROP  # ... and is: no session yet
    dp.clear_sessions()
    assert run(dp, FLOW) == PASS
    assert run(dp, reply) == PASS
    assert run(dp, FLOW) == PASS
    # another flow of the same hosts is judged on its own
    assert run(dp, pk("192.0.2.1", "10.0.0.1", "tcp", 80, 5556, "ingress")) == DROP
    # the session is oriented as the flow's first packet went
    (sess,) = [s for s in dp.sessions() if s.src_port == 5555]
    assert (sess.src_ip, sess.dst_ip, sess.src_port, sess.dst_port) == (
        "10.0.0.1",
        "192.0.2.1",
        5555,
        80,
    )
    assert (sess.direction, sess.verdict, sess.rule_id) == ("egress", "allow", 1)


def test_reply_shares_denied_verdict(dp: Datapath) -> None:
    """A flow denied on its first packet stays denied in both directions (even if the reply,
    judged alone, would be allowed)."""
    pol = install(dp, "allow", R(1, direction="egress", protocol="tcp", dst_port=80, action="deny"))
    assert judge(pol, FLOW.reply()).passes
    assert run(dp, FLOW) == DROP
    assert run(dp, FLOW.reply()) == DROP


def test_policy_change_cuts_established_flow(dp: Datapath) -> None:
    install(dp, "deny", R(1, direction="egress", protocol="tcp", dst_port=80))
    assert run(dp, FLOW) == PASS
    assert run(dp, FLOW.reply()) == PASS
    pol = parse_policy_document(
        {
            "default_action": "deny",
            "policies": [
                R(1, direction="egress", protocol="tcp", dst_port=80),
                R(2, dst_ip="192.0.2.1", action="deny"),
            ],
        }
    )
    gen = dp.apply(compile_policy(pol, dp.config.max_shapes))  # sessions kept
    delta = Delta(dp)
    assert run(dp, FLOW.reply()) == DROP
    assert run(dp, FLOW) == DROP
    d = delta()
    assert d["rejudged_sessions"] == 1 and d["session_hits"] == 1 and d["denied_packets"] == 2
    assert "new_sessions" not in d
    (sess,) = list(dp.sessions())
    assert (sess.verdict, sess.rule_id, sess.generation) == ("deny", 2, gen)
    # and back: allowed again by the next change
    install_keep = parse_policy_document({"default_action": "allow", "policies": []})
    dp.apply(compile_policy(install_keep, dp.config.max_shapes))
    assert run(dp, FLOW.reply()) == PASS


@pytest.mark.parametrize(
    ("default", "rule", "want"),
    [
        # The reply's tuple and direction would be allowed; the flow's own packet is not.
        ("deny", R(2, direction="ingress", protocol="tcp", src_port=80), DROP),
        # The reply's tuple and direction would be denied; the flow's own packet is not.
        ("allow", R(2, direction="ingress", protocol="tcp", src_port=80, action="deny"), PASS),
        ("allow", R(2, src_ip="192.0.2.1", action="deny"), PASS),
        ("deny", R(2, src_ip="192.0.2.1", dst_ip="10.0.0.1"), DROP),
    ],
)
def test_rejudged_in_the_flows_original_direction(
    dp: Datapath, default: str, rule: dict[str, Any], want: int
) -> None:
    first = install(dp, "deny", R(1, direction="egress", protocol="tcp", dst_port=80))
    ref = StatefulReference(first)
    assert run(dp, FLOW) == PASS and ref.process(FLOW).passes
    pol = parse_policy_document({"default_action": default, "policies": [rule]})
    dp.apply(compile_policy(pol, dp.config.max_shapes))
    ref.set_policy(pol)
    reply = FLOW.reply()
    alone = judge(pol, reply).passes
    assert alone == (want == DROP), "the case must tell the two directions apart"
    assert (PASS if ref.process(reply).passes else DROP) == want
    assert run(dp, reply) == want
    assert run(dp, FLOW) == want


def test_session_packets_and_bytes_per_direction(dp: Datapath) -> None:
    install(dp, "deny", R(3, direction="egress", protocol="tcp", dst_port=80))
    orig = Packet.of("10.0.0.1", "192.0.2.1", "tcp", 5555, 80, "egress", length=100, tcp_flags=0x02)
    reply = Packet.of(
        "192.0.2.1", "10.0.0.1", "tcp", 80, 5555, "ingress", length=250, tcp_flags=0x12
    )
    for p in (orig, reply, orig, orig, reply):
        assert run(dp, p) == PASS
    (s,) = list(dp.sessions())
    assert (s.src_ip, s.dst_ip, s.src_port, s.dst_port, s.protocol, s.family) == (
        "10.0.0.1",
        "192.0.2.1",
        5555,
        80,
        6,
        4,
    )
    assert (s.direction, s.verdict, s.rule_id, s.ifindex) == ("egress", "allow", 3, 1)
    assert (s.packets_out, s.bytes_out, s.packets_in, s.bytes_in) == (3, 300, 2, 500)
    assert s.tcp_flags == 0x12
    assert 0 < s.first_seen_ns <= s.last_seen_ns
    assert s.generation == dp.active()[0]


def test_ipv6_session_key_orders_endpoints(dp: Datapath) -> None:
    """Both directions of IPv6 flows (addresses differing only in a late word, or equal
    addresses told apart by ports) find one session."""
    install(dp, "deny", R(1, direction="ingress", protocol="udp"))
    flows = [
        pk("2001:db8::2:1", "2001:db8::1:2", "udp", 1, 2, "ingress"),
        pk("2001:db8::1", "2001:db8::1", "udp", 9, 8, "ingress"),
        pk("10.0.0.1", "10.0.0.1", "udp", 9, 8, "ingress"),
    ]
    for f in flows:
        assert run(dp, f) == PASS
        assert run(dp, f.reply()) == PASS
    assert len(list(dp.sessions())) == len(flows)


# ---- counters ------------------------------------------------------------------------------


def test_counters_match_what_was_sent(dp: Datapath, datapath_events: EventSink) -> None:
    install(
        dp,
        "deny",
        R(11, direction="egress", protocol="tcp", dst_port=80),
        R(12, protocol="udp", dst_port=53, action="log"),
        R(13, protocol="tcp", dst_port=23, action="deny"),
    )
    datapath_events.drain()
    rules_before = {r: dp.rule_counters(r) for r in (11, 12, 13)}
    default_before = dp.default_counters()
    delta = Delta(dp)

    allow = pk("10.0.0.1", "192.0.2.1", "tcp", 4000, 80, "egress", length=100)
    log = pk("10.0.0.1", "192.0.2.53", "udp", 4001, 53, "egress", length=80)
    deny = pk("192.0.2.9", "10.0.0.1", "tcp", 4002, 23, "ingress", length=70)
    default = pk("2001:db8::9", "2001:db8::1", "tcp", 4003, 9999, "ingress", length=90)
    sent: list[tuple[Packet, int]] = [
        (allow, PASS),
        (allow, PASS),
        (Packet.of("192.0.2.1", "10.0.0.1", "tcp", 80, 4000, "ingress", length=60), PASS),
        (log, PASS),
        (Packet.of("192.0.2.53", "10.0.0.1", "udp", 53, 4001, "ingress", length=90), PASS),
        (deny, DROP),
        (deny, DROP),
        (deny, DROP),
        (default, DROP),
        (default, DROP),
    ]
    for p, want in sent:
        assert run(dp, p) == want
    extra = [
        eth(arp(), ETH_P_ARP),
        eth(bytes(46), 0x88CC),
        eth(ipv4("10.0.0.1", "10.0.0.2", 17, bytes(24), frag_offset=3), ETH_P_IP),
    ]
    assert [run(dp, f, "ingress") for f in extra] == [PASS, DROP, DROP]

    expected = {
        "total_packets": 13,
        "total_bytes": 260 + 170 + 210 + 180 + sum(len(f) for f in extra),
        "allowed_packets": 3,
        "logged_packets": 2,
        "denied_packets": 5,
        "new_sessions": 4,
        "session_hits": 6,
        "policy_hits": 3,
        "policy_misses": 1,
        "events_sent": 3,  # the first packet of the log, deny and default-deny flows
        "l2_passed": 1,
        "parse_drops": 1,
        "fragment_drops": 1,
        "fragment_drops_no_first": 1,
        "policy_drops": 5,
        "active_sessions": 4,
        "egress_allow_packets": 2,
        "ingress_allow_packets": 1,
        "egress_log_packets": 1,
        "ingress_log_packets": 1,
        "ingress_deny_packets": 5,
    }
    assert delta() == expected
    for rid, (packets, nbytes) in {11: (3, 260), 12: (2, 170), 13: (3, 210)}.items():
        now = dp.rule_counters(rid)
        assert (now.packets - rules_before[rid].packets, now.bytes - rules_before[rid].bytes) == (
            packets,
            nbytes,
        ), f"rule {rid}"
        assert now.last_hit_ns > 0
    d = dp.default_counters()
    assert (d.packets - default_before.packets, d.bytes - default_before.bytes) == (2, 180)
    assert len(datapath_events.drain()) == 3
    assert _pb(dp.rule_counters(999)) == (0, 0)  # unknown rule: zeros


def test_rule_counters_start_at_zero_and_survive_unrelated_changes(dp: Datapath) -> None:
    install(dp, "allow", R(21, protocol="udp"))
    p = pk("10.0.0.1", "10.0.0.2", "udp", 1, 2, length=64)
    assert run(dp, p) == PASS
    assert _pb(dp.rule_counters(21)) == (1, 64)
    # rule 21 stays in the set: its counters go on
    install(dp, "allow", R(21, protocol="udp"), R(22, protocol="tcp"))
    assert _pb(dp.rule_counters(22)) == (0, 0)
    assert run(dp, p) == PASS
    assert _pb(dp.rule_counters(21)) == (2, 128)
    # removed, then added back: a new rule, counting from zero
    install(dp, "allow", R(22, protocol="tcp"))
    assert _pb(dp.rule_counters(21)) == (0, 0)
    install(dp, "allow", R(21, protocol="udp"))
    assert _pb(dp.rule_counters(21)) == (0, 0)


# ---- atomic apply --------------------------------------------------------------------------


def test_apply_increments_generation_and_flips_bank(dp: Datapath) -> None:
    gen, bank = dp.active()
    pol = parse_policy_document({"default_action": "allow", "policies": []})
    c = compile_policy(pol, dp.config.max_shapes)
    assert dp.apply(c) == gen + 1
    assert dp.active() == (gen + 1, bank ^ 1)
    assert dp.apply(c) == gen + 2
    assert dp.active() == (gen + 2, bank)
    assert dp.apply(c, generation=gen + 10) == gen + 10
    assert dp.apply(c, generation=1) == gen + 11  # never backwards


def test_packets_never_see_a_half_applied_set(dp: Datapath) -> None:
    """While sets are swapped back and forth, every new flow is judged by one whole set: the
    probe is allowed by both sets, by rules in different shapes, each of which also holds a
    deny that would catch the probe if its allow were missing."""
    filler = [
        R(
            1000 + i,
            src_ip=f"172.{16 + i % 16}.{i // 16 % 256}.0/24",
            protocol="udp",
            dst_port=1000 + i,
            action="deny",
        )
        for i in range(3000)
    ]
    set_a = parse_policy_document(
        {
            "default_action": "deny",
            "policies": [
                R(1, dst_ip="10.1.2.3", protocol="tcp", priority=200),
                R(2, dst_ip="10.0.0.0/8", action="deny", priority=150),
                *filler,
            ],
        }
    )
    set_b = parse_policy_document(
        {
            "default_action": "deny",
            "policies": [
                R(3, dst_ip="10.1.0.0/16", dst_port="1-65535", protocol="tcp", priority=300),
                R(4, action="deny", priority=250),
                *filler,
            ],
        }
    )
    compiled = [compile_policy(s, dp.config.max_shapes) for s in (set_a, set_b)]
    dp.apply(compiled[0])
    dp.clear_sessions()
    stop = threading.Event()
    results = {"sent": 0, "dropped": 0}
    prog = prog_fd(dp, "ingress")
    frames = [
        frame(pk(f"192.168.{i // 250}.{i % 250 + 1}", "10.1.2.3", "tcp", 1024 + i, 443))
        for i in range(20000)
    ]

    def probe() -> None:
        for data in frames:
            if stop.is_set():
                break
            results["sent"] += 1
            if bpf_test_run(prog, data)[0] != PASS:
                results["dropped"] += 1

    t = threading.Thread(target=probe)
    t.start()
    applied = 0
    try:
        # at least 12 swaps, and on until the probe has run for a while alongside them
        for i in range(400):
            dp.apply(compiled[(i + 1) % 2])
            applied += 1
            if applied >= 12 and (results["sent"] >= 3000 or not t.is_alive()):
                break
    finally:
        stop.set()
        t.join(timeout=60)
    dp.clear_sessions()
    assert not t.is_alive()
    assert results["sent"] >= 1000, (results, applied)
    assert results["dropped"] == 0, (results, applied)


def test_a_failed_retire_is_raised_at_the_next_settle_and_its_keys_cleared_later(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a flip the old bank is cleared beside the caller. A failure there is not lost with
    its thread, nor are the keys it left: the next settle (every apply and close runs one)
    tries again and logs what failed; if that fails too it raises, the live bank stays, and a
    later settle clears them."""
    cfg = DatapathConfig(
        instance=f"test-retire-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=1024,
        max_shapes=8,
        rule_slots=64,
        rule_entries=4096,
    )

    def pol(*ids: int) -> CompiledPolicy:
        rules = [R(i, src_ip=f"10.{i}.0.0/16", dst_port=i) for i in ids]
        return compile_policy(parse_policy_document({"policies": rules}), cfg.max_shapes)

    with loaded_datapath(cfg) as dp:
        failures = 0
        real_delete = dp._maps.delete_batch

        def flaky(name: str, keys: list[bytes]) -> None:
            nonlocal failures
            if failures and name == "rules4" and keys:
                failures -= 1
                raise KeysLeft(name, keys, errno.EBUSY)
            real_delete(name, keys)

        monkeypatch.setattr(dp._maps, "delete_batch", flaky)

        def stored() -> int:
            return len(list(dp._bpf["rules4"].keys()))

        def retired() -> None:  # the retire thread has run (whatever became of it)
            for t in threading.enumerate():
                if t.name == "microseg-retire":
                    t.join()

        dp.apply(pol(1, 2))
        dp.settle()
        live = stored()
        assert live > 0

        # Fails once: the retry at the next settle clears the old bank, and says so.
        failures = 1
        dp.apply(pol(3, 4))
        retired()
        assert stored() == 2 * live  # the old bank's keys are still there, and still known
        assert dp.map_fill()["rules4"].entries == 2 * live
        with caplog.at_level(logging.WARNING, logger="streamer.datapath.banks"):
            dp.settle()
        assert "clearing the retired policy bank" in caplog.text
        assert os.strerror(errno.EBUSY) in caplog.text
        assert stored() == live and dp.map_fill()["rules4"].entries == live

        # Fails twice (in the thread and on the retry): the next apply raises and changes
        # nothing; the one after clears the old bank and applies.
        failures = 2
        gen = dp.apply(pol(5, 6))
        retired()
        with pytest.raises(DatapathError, match="clearing the retired policy bank"):
            dp.apply(pol(7, 8))
        assert dp.active()[0] == gen and stored() == 2 * live
        assert run(dp, pk("10.5.0.1", "10.0.0.2", "tcp", 1, 5)) == PASS  # still enforcing
        gen = dp.apply(pol(7, 8))
        dp.settle()
        assert dp.active()[0] == gen and stored() == live
        assert set(dp.all_rule_counters()) == {7, 8}

        # A retire that fails at close is raised there, once our references are released;
        # the keys it left stay in the pinned map, where the next load finds and clears them.
        failures = 2
        dp.apply(pol(9))
        retired()
        with pytest.raises(DatapathError, match="clearing the retired policy bank"):
            dp.close()
        assert not dp.loaded
        dp.close()  # nothing left to wait for
        with Datapath(cfg) as again:
            assert len(list(again._bpf["rules4"].keys())) == live + live // 2
            again.apply(pol(10))
            again.settle()
            assert len(list(again._bpf["rules4"].keys())) == live // 2
        assert not again.loaded


@pytest.fixture(scope="module")
def small_dp() -> Iterator[Datapath]:
    """A classifier with room for 8 shapes per family and 15 rule counter slots."""
    cfg = DatapathConfig(
        instance=f"test-small-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=1024,
        max_shapes=8,
        rule_slots=16,
        rule_entries=4096,
        event_interval_ns=50_000_000,
    )
    with loaded_datapath(cfg) as dp:
        yield dp


def _many_shapes(n: int, first_id: int = 100) -> PolicySet:
    return parse_policy_document(
        {
            "default_action": "allow",
            "policies": [
                R(first_id + p, src_ip=f"10.0.0.0/{p}", action="deny") for p in range(8, 8 + n)
            ],
        }
    )


def test_more_shapes_than_the_classifier_holds_are_merged(small_dp: Datapath) -> None:
    dp = small_dp
    install(dp, "deny", R(1, protocol="tcp", dst_port=22))
    gen = dp.active()
    # A set compiled for a larger table must not be written past this one's shape slots.
    too_big = compile_policy(_many_shapes(12), 1024)
    assert len(too_big.v4.shapes) == 12
    with pytest.raises(DatapathError):
        dp.apply(too_big)
    assert dp.active() == gen
    # Compiled for this table, the 12 shapes are merged into 8 and judge exactly the same.
    pol = _many_shapes(12)
    fitted = compile_policy(pol, dp.config.max_shapes)
    assert len(fitted.v4.shapes) <= 8
    assert dp.apply(fitted) == gen[0] + 1
    rng = random.Random(7)
    for p in range(6, 22):
        for _ in range(4):
            inside = ipaddress.IPv4Address(
                int(ipaddress.IPv4Address("10.0.0.0")) | rng.getrandbits(32 - p)
            )
            dp.clear_sessions()
            pkt = pk(str(inside), "192.0.2.1", "udp", 1, 2)
            assert run(dp, pkt) == (PASS if judge(pol, pkt).passes else DROP), (p, inside)


def test_out_of_rule_slots_raises_and_live_set_keeps_enforcing(small_dp: Datapath) -> None:
    dp = small_dp
    install(dp, "deny")  # no rule holds a slot
    install(dp, "deny", *[R(200 + i, dst_port=1000 + i, protocol="tcp") for i in range(10)])
    gen = dp.active()
    # 10 live + 6 new > 15 slots
    crowd = parse_policy_document(
        {
            "default_action": "allow",
            "policies": [
                R(300 + i, dst_port=2000 + i, protocol="tcp", action="deny") for i in range(6)
            ],
        }
    )
    with pytest.raises(DatapathError, match="slots"):
        dp.apply(compile_policy(crowd, dp.config.max_shapes))
    assert dp.active() == gen
    dp.clear_sessions()
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 1005)) == PASS
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 2005)) == DROP
    # A failed apply must not leak slots: 10 live + 5 new fit.
    fits = parse_policy_document(
        {
            "default_action": "allow",
            "policies": [
                R(400 + i, dst_port=3000 + i, protocol="tcp", action="deny") for i in range(5)
            ],
        }
    )
    dp.apply(compile_policy(fits, dp.config.max_shapes))
    dp.clear_sessions()
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 3004)) == DROP
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 1005)) == PASS


def test_events_update_after_interval(small_dp: Datapath) -> None:
    dp = small_dp
    install(dp, "deny")
    records: list[bytes] = []
    dp.open_events(records.append)

    def drain() -> list[bytes]:
        dp.consume_events()
        out = records[:]
        records.clear()
        return out

    drain()
    p = pk("10.0.0.1", "10.0.0.2", "udp", 7, 8, length=100)
    assert run(dp, p) == DROP
    assert run(dp, p) == DROP
    (new,) = drain()
    threading.Event().wait(dp.config.event_interval_ns / 1e9 * 3)
    assert run(dp, p.reply()) == DROP
    (upd,) = drain()
    e_new, e_upd = EVENT.unpack(new), EVENT.unpack(upd)
    assert (e_new[1], e_new[2], e_new[15]) == (1, 100, 1)  # packets, bytes, kind new
    assert (e_upd[1], e_upd[2], e_upd[15]) == (2, 200, 2)  # since the first event; update
    assert e_upd[0] > e_new[0]


def test_full_table_keeps_the_event_rate_limit() -> None:
    """A denied flow that finds the session table full is judged on every packet, but sends
    one `new` event and then, after the interval, one `update` with every packet since."""
    cfg = DatapathConfig(
        instance=f"test-full-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=4,
        event_interval_ns=50_000_000,
    )
    with loaded_datapath(cfg) as dp:
        install(dp, "deny")
        records: list[bytes] = []
        dp.open_events(records.append)
        for i in range(8):  # fill the table (4 flows; the rest are turned away)
            run(dp, pk(f"10.1.0.{i + 1}", "10.0.0.2", "udp", 7, 8))
        assert dp.counters()["active_sessions"] == 4
        dp.consume_events()
        records.clear()
        c0 = dp.counters()["session_create_failed"]
        p = pk("10.0.0.1", "10.0.0.2", "udp", 7, 9, length=100)
        for _ in range(5):
            assert run(dp, p) == DROP
        dp.consume_events()
        assert dp.counters()["session_create_failed"] == c0 + 5
        (new,) = records
        records.clear()
        threading.Event().wait(cfg.event_interval_ns / 1e9 * 3)
        assert run(dp, p) == DROP
        dp.consume_events()
        (upd,) = records
        e_new, e_upd = EVENT.unpack(new), EVENT.unpack(upd)
        assert (e_new[1], e_new[2], e_new[15]) == (1, 100, 1)  # packets, bytes, kind new
        assert (e_upd[1], e_upd[2], e_upd[15]) == (5, 500, 2)  # the 4 held back and this one


def test_attach_modes_replace_each_other(lab: Lab) -> None:
    """tcx links and clsact filters: each mode replaces the other's attachment (after its own
    is in), a second attach in the same mode swaps the program in place, and detach removes
    whatever is there; traffic is judged by one of ours throughout."""
    cfg = DatapathConfig(
        instance=f"test-attach-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=1024,
        run_dir=Path(tempfile.mkdtemp(prefix="ms-attach-")),
    )

    def ours() -> dict[str, list[int]]:
        tcx = tcx_programs(lab.host_if, lab.host_ns)
        out = {h: [i for i, n in progs if n == f"ms_{h}"] for h, progs in tcx.items()}
        for h in out:
            shown = subprocess.run(
                ["tc", "-n", lab.host_ns, "filter", "show", "dev", lab.host_if, h],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            out[h] += [-int(m[1]) for m in re.finditer(rf"ms_{h} .*?\bid (\d+)", shown)]
        return out  # tcx ids positive, clsact filter ids negative

    try:
        with loaded_datapath(replace(cfg, attach_mode="tc")) as dp:
            dp.apply(compile_policy(parse_policy_document({"default_action": "allow"}), 1024))
            dp.attach(lab.host_if, lab.host_ns)
            first = ours()
            assert all(len(v) == 1 and v[0] < 0 for v in first.values()), first
            for mode, sign in (("tcx", 1), ("tcx", 1), ("auto", 1), ("tc", -1)):
                again = Datapath(replace(cfg, attach_mode=mode))
                again.load()
                try:
                    again.attach(lab.host_if, lab.host_ns)
                    # what was attached, never the mode asked ("auto")
                    attached = "tc" if sign < 0 else "tcx"
                    assert again.attached_as == {lab.host_if: attached}, mode
                    record = json.loads(cfg.attachments_file.read_text())
                    assert record[f"{lab.host_ns}/{lab.host_if}"]["mode"] == attached, record
                finally:
                    again.close()
                now = ours()
                assert all(len(v) == 1 and v[0] * sign > 0 for v in now.values()), (mode, now)
                assert now != first, mode  # the new programs, in place
                first = now
            with pytest.raises(DatapathError, match="attach mode"):
                Datapath(replace(cfg, attach_mode="xdp")).attach(lab.host_if, lab.host_ns)
            removed = detach(lab.host_if, lab.host_ns, cfg.run_dir)
            # the first attach made the clsact qdisc, so it goes too
            want = [f"{lab.host_if} {x}" for x in ("clsact", "egress", "ingress")]
            assert sorted(removed) == want
            assert ours() == {"ingress": [], "egress": []}
    finally:
        detach(lab.host_if, lab.host_ns, cfg.run_dir)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)


def test_restart_adopts_pinned_state(small_dp: Datapath) -> None:
    """A second Datapath on the same pins (an agent restart) keeps enforcing, knows the live
    bank's rules and counters, and replaces the set cleanly. Runs last in this module: the
    first instance's bookkeeping is stale afterwards."""
    dp = small_dp
    install(
        dp,
        "deny",
        R(31, src_ip="2001:db8::/32", protocol="udp", dst_port="100-103"),
        R(32, src_ip="10.0.0.0/8", protocol="tcp"),
    )
    p6 = pk("2001:db8::1", "2001:db8::2", "udp", 9, 101)
    assert run(dp, p6) == PASS
    gen = dp.active()
    second = Datapath(dp.config)
    try:
        second.load()
        assert second.active() == gen
        assert run(second, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 2)) == PASS
        assert run(second, pk("11.0.0.1", "10.0.0.2", "tcp", 1, 2)) == DROP
        assert _pb(second.rule_counters(31)) == (1, len(frame(p6)))
        for bank in (0, 1):
            for fam, size in ((4, 16), (6, 40)):
                assert all(len(k) == size for k in second._banks.keys[bank][fam])
        second.apply(
            compile_policy(
                parse_policy_document(
                    {
                        "default_action": "allow",
                        "policies": [R(33, dst_ip="2001:db8::2", action="deny")],
                    }
                ),
                8,
            )
        )
        second.settle()  # the old bank is cleared beside the caller
        assert len(list(second._bpf["rules4"].keys())) == 0
        assert len(list(second._bpf["rules6"].keys())) == 2  # one key per direction
        second.clear_sessions()
        assert run(second, p6) == DROP
        assert run(second, pk("11.0.0.1", "10.0.0.2", "tcp", 1, 2)) == PASS
    finally:
        second.close()


# ---- events --------------------------------------------------------------------------------


def _decode(raw: bytes) -> dict[str, Any]:
    assert len(raw) == EVENT.size
    (
        ts,
        packets,
        nbytes,
        ifindex,
        rule_id,
        gen,
        family,
        proto,
        direction,
        verdict,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        kind,
        _pad,
    ) = EVENT.unpack(raw)
    alen = 4 if family == 4 else 16
    return {
        "ts": ts,
        "packets": packets,
        "bytes": nbytes,
        "ifindex": ifindex,
        "rule_id": rule_id,
        "gen": gen,
        "family": family,
        "proto": proto,
        "direction": direction,
        "verdict": verdict,
        "src": str(ipaddress.ip_address(src[:alen])),
        "dst": str(ipaddress.ip_address(dst[:alen])),
        "sport": sport,
        "dport": dport,
        "tcp_flags": tcp_flags,
        "kind": kind,
    }


def test_events(dp: Datapath, datapath_events: EventSink) -> None:
    install(
        dp,
        "deny",
        R(7, protocol="tcp", dst_port=22, action="deny", name="no-ssh"),
        R(8, protocol="udp", dst_port=53, action="log"),
        R(9, protocol="tcp", dst_port=443),
    )
    gen = dp.active()[0]
    sink = datapath_events
    sink.drain()

    syn = Packet.of("10.9.8.7", "10.0.0.5", "tcp", 40000, 22, "ingress", tcp_flags=0x02)
    assert run(dp, syn) == DROP
    (raw,) = sink.drain()
    ev = _decode(raw)
    assert ev.pop("ts") > 0
    assert ev == {
        "packets": 1,
        "bytes": len(frame(syn)),
        "ifindex": 1,
        "rule_id": 7,
        "gen": gen,
        "family": 4,
        "proto": 6,
        "direction": 1,
        "verdict": 1,
        "src": "10.9.8.7",
        "dst": "10.0.0.5",
        "sport": 40000,
        "dport": 22,
        "tcp_flags": 0x02,
        "kind": 1,
    }
    # the same flow again, within the interval: nothing new (also not for its reply)
    assert run(dp, syn) == DROP
    assert run(dp, syn.reply()) == DROP
    assert sink.drain() == []

    # a logged IPv6 flow, first seen egress
    q = Packet.of("2001:db8::10", "2001:db8:1::53", "udp", 5353, 53, "egress")
    assert run(dp, q) == PASS
    (raw,) = sink.drain()
    ev = _decode(raw)
    assert (ev["family"], ev["proto"], ev["direction"], ev["verdict"], ev["rule_id"]) == (
        6,
        17,
        2,
        2,
        8,
    )
    assert (ev["src"], ev["dst"], ev["sport"], ev["dport"]) == (
        "2001:db8::10",
        "2001:db8:1::53",
        5353,
        53,
    )
    # its reply, within the interval: no new event
    assert run(dp, q.reply()) == PASS
    assert sink.drain() == []

    # allowed flows: no events
    ok = pk("10.0.0.5", "10.9.8.7", "tcp", 40001, 443, "egress")
    assert run(dp, ok) == PASS
    assert run(dp, ok.reply()) == PASS
    assert sink.drain() == []

    # default deny: an event without a rule
    other = pk("10.0.0.5", "10.9.8.7", "udp", 1, 2)
    assert run(dp, other) == DROP
    (raw,) = sink.drain()
    assert (_decode(raw)["rule_id"], _decode(raw)["verdict"]) == (0, 1)

    # a flow whose verdict changes with the policy is reported afresh
    pol = parse_policy_document(
        {"default_action": "deny", "policies": [R(9, protocol="tcp", dst_port=443, action="log")]}
    )
    gen2 = dp.apply(compile_policy(pol, dp.config.max_shapes))
    assert run(dp, ok.reply()) == PASS
    (raw,) = sink.drain()
    ev = _decode(raw)
    assert (ev["verdict"], ev["rule_id"], ev["gen"], ev["kind"], ev["direction"]) == (
        2,
        9,
        gen2,
        1,
        2,
    )
    assert (ev["src"], ev["sport"]) == ("10.0.0.5", 40001)  # still the originator
