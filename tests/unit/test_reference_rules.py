"""The reference model (`streamer.datapath.reference`), rules: verdicts and decisions, rule
matching one field at a time, judging and its tie-breaks."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address

import pytest
from support.refmodel import A4, A6, B4, B6, policy, rule, tcp4

from streamer.datapath.reference import Decision, Packet, Verdict, judge, rule_matches
from streamer.policy.model import PolicySet

# --- Verdict / Decision ---------------------------------------------------------------


def test_verdict_numbers_are_the_kernel_contract() -> None:
    assert [(v.name, int(v)) for v in Verdict] == [
        ("ALLOW", 0),
        ("DENY", 1),
        ("LOG", 2),
        ("PASS_L2", 3),
        ("DROP_PARSE", 4),
        ("DROP_FRAGMENT", 5),
        ("PASS_RELATED", 6),
        ("DROP_PRESSURE", 7),
    ]


def test_decision_passes() -> None:
    passing = {Verdict.ALLOW, Verdict.LOG, Verdict.PASS_L2, Verdict.PASS_RELATED}
    for verdict in Verdict:
        assert Decision(verdict).passes is (verdict in passing)


def test_packet_checks_itself() -> None:
    with pytest.raises(ValueError):
        Packet(4, IPv6Address(A6), IPv4Address(B4), 6)
    with pytest.raises(ValueError):
        Packet(5, IPv4Address(A4), IPv4Address(B4), 6)
    with pytest.raises(ValueError):
        Packet.of(A4, B4, 6, 70000, 1)
    with pytest.raises(ValueError):
        Packet.of(A4, B4, 6, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Packet.of(A4, B4, "sctp")
    p = Packet.of(A6, B6, "icmpv6", 5, 5, "egress", ifindex=3)
    assert (p.family, p.proto, p.ifindex) == (6, 58, 3)
    assert p.reply() == Packet.of(B6, A6, 58, 5, 5, "ingress", ifindex=3)


# --- matching, one field at a time ----------------------------------------------------


def test_match_direction() -> None:
    ingress, egress = tcp4(direction="ingress"), tcp4(direction="egress")
    assert rule_matches(rule(direction="ingress"), ingress)
    assert not rule_matches(rule(direction="ingress"), egress)
    assert rule_matches(rule(direction="egress"), egress)
    assert not rule_matches(rule(direction="egress"), ingress)
    assert rule_matches(rule(direction="any"), ingress)
    assert rule_matches(rule(direction="any"), egress)


def test_match_protocol() -> None:
    gre = Packet.of(A4, B4, 47)
    udp4 = Packet.of(A4, B4, "udp", 5, 53)
    assert rule_matches(rule(protocol="tcp"), tcp4())
    assert not rule_matches(rule(protocol="tcp"), udp4)
    assert rule_matches(rule(protocol="udp"), udp4)
    assert rule_matches(rule(protocol="any"), gre)
    assert not rule_matches(rule(protocol="tcp"), gre)
    # icmp is ICMP of IPv4, icmpv6 ICMP of IPv6
    assert rule_matches(rule(protocol="icmp"), Packet.of(A4, B4, 1, 9, 9))
    assert not rule_matches(rule(protocol="icmp"), Packet.of(A6, B6, 1))
    assert rule_matches(rule(protocol="icmpv6"), Packet.of(A6, B6, 58, 9, 9))
    assert not rule_matches(rule(protocol="icmpv6"), Packet.of(A4, B4, 58))
    assert not rule_matches(rule(protocol="icmp"), Packet.of(A6, B6, 58))


def test_match_addresses() -> None:
    p4 = Packet.of("10.1.2.3", "192.168.0.9", "tcp", 1, 2)
    p6 = Packet.of("2001:db8:1::5", "fd00::9", "tcp", 1, 2)
    assert rule_matches(rule(src_ip="10.0.0.0/8"), p4)
    assert rule_matches(rule(src_ip="10.1.2.3"), p4)
    assert not rule_matches(rule(src_ip="10.1.2.4"), p4)
    assert not rule_matches(rule(src_ip="11.0.0.0/8"), p4)
    assert rule_matches(rule(dst_ip="192.168.0.0/24"), p4)
    assert not rule_matches(rule(dst_ip="192.168.1.0/24"), p4)
    assert not rule_matches(rule(src_ip="192.168.0.9"), p4)  # dst, not src
    assert rule_matches(rule(src_ip="2001:db8::/32", dst_ip="fd00::/8"), p6)
    assert not rule_matches(rule(src_ip="2001:db9::/32"), p6)
    # "any" is both families; 0.0.0.0/0 and ::/0 one each
    assert rule_matches(rule(), p4)
    assert rule_matches(rule(), p6)
    assert rule_matches(rule(src_ip="0.0.0.0/0"), p4)
    assert not rule_matches(rule(src_ip="0.0.0.0/0"), p6)
    assert rule_matches(rule(dst_ip="::/0"), p6)
    assert not rule_matches(rule(dst_ip="::/0"), p4)
    assert not rule_matches(rule(src_ip="10.0.0.0/8"), p6)


def test_match_ports_inclusive() -> None:
    r = rule(protocol="tcp", dst_port="1000-2000")
    assert not rule_matches(r, tcp4(dport=999))
    assert rule_matches(r, tcp4(dport=1000))
    assert rule_matches(r, tcp4(dport=1500))
    assert rule_matches(r, tcp4(dport=2000))
    assert not rule_matches(r, tcp4(dport=2001))
    r = rule(protocol="tcp", src_port=40000)
    assert rule_matches(r, tcp4(sport=40000))
    assert not rule_matches(r, tcp4(sport=40001))
    both = rule(protocol="tcp", src_port="1-10", dst_port=80)
    assert rule_matches(both, tcp4(sport=10, dport=80))
    assert not rule_matches(both, tcp4(sport=11, dport=80))
    assert not rule_matches(both, tcp4(sport=10, dport=81))


def test_port_condition_needs_tcp_or_udp() -> None:
    echo = Packet.of(A4, B4, "icmp", 80, 80)
    gre = Packet.of(A4, B4, 47)
    for port in (80, "0-65535", "0-0"):
        r = rule(protocol="any", dst_port=port)
        assert not rule_matches(r, echo)
        assert not rule_matches(r, gre)
        assert not rule_matches(r, Packet.of(A6, B6, "icmpv6", 80, 80))
    assert rule_matches(rule(dst_port="0-65535"), tcp4(dport=0))
    assert rule_matches(rule(dst_port="0-65535"), Packet.of(A6, B6, "udp", 1, 65535))
    assert rule_matches(rule(dst_port="0-0"), tcp4(dport=0))
    assert not rule_matches(rule(dst_port="0-0"), tcp4(dport=1))
    # int 0 is no condition at all
    assert rule_matches(rule(dst_port=0), gre)


# --- judging and tie-breaks -----------------------------------------------------------


def test_default_actions() -> None:
    p = tcp4()
    assert judge(policy(), p) == Decision(Verdict.ALLOW, None)
    assert judge(policy(default="deny"), p) == Decision(Verdict.DENY, None)
    no_match = rule(protocol="udp", action="allow")
    assert judge(policy(no_match, default="deny"), p) == Decision(Verdict.DENY)


def test_actions_map_to_verdicts() -> None:
    for action, verdict in (("allow", Verdict.ALLOW), ("deny", Verdict.DENY), ("log", Verdict.LOG)):
        r = rule(action=action)
        assert judge(policy(r, default="deny" if action == "allow" else "allow"), tcp4()) == (
            Decision(verdict, r)
        )


def test_priority_wins() -> None:
    low_deny = rule(1, action="deny", priority=10)
    high_allow = rule(2, action="allow", priority=11)
    assert judge(policy(low_deny, high_allow), tcp4()).rule == high_allow
    assert judge(policy(high_allow, low_deny), tcp4()).rule == high_allow


def test_tie_deny_beats_log_beats_allow() -> None:
    allow, log, deny = rule(1, action="allow"), rule(2, action="log"), rule(3, action="deny")
    assert judge(policy(allow, log, deny), tcp4()).rule == deny
    assert judge(policy(deny, allow, log), tcp4()).rule == deny
    assert judge(policy(allow, log), tcp4()).rule == log
    assert judge(policy(log, allow), tcp4()).verdict is Verdict.LOG


def test_tie_lowest_rule_id() -> None:
    a, b = rule(7, action="deny", name="a"), rule(3, action="deny", name="b")
    assert judge(policy(a, b), tcp4()).rule == b
    assert judge(policy(b, a), tcp4()).rule == b


def test_non_matching_better_rule_is_ignored() -> None:
    better = rule(1, action="deny", priority=500, protocol="udp")
    worse = rule(2, action="allow", priority=1)
    assert judge(policy(better, worse, default="deny"), tcp4()).rule == worse


def _sorted_first_match(ps: PolicySet, pkt: Packet) -> Decision:
    """An independent formulation of contract §2's order: sort, then take the first match."""
    rank = {"deny": 2, "log": 1, "allow": 0}
    ordered = sorted(ps.policies, key=lambda r: (-r.priority, -rank[r.action], r.rule_id))
    for r in ordered:
        if rule_matches(r, pkt):
            return Decision(Verdict[r.action.upper()], r)
    return Decision(Verdict[ps.default_action.upper()])


def test_judge_agrees_with_sorted_first_match() -> None:
    rng = random.Random(11)
    nets4 = ["any", "10.0.0.0/8", "10.0.0.1", "10.0.0.2", "0.0.0.0/0", "192.168.0.0/16"]
    nets6 = ["any", "2001:db8::/32", "2001:db8::1", "::/0"]
    for _ in range(150):
        rules = []
        for rule_id in rng.sample(range(1, 10_000), 12):
            family_nets = nets4 if rng.random() < 0.6 else nets6
            proto = rng.choice(["tcp", "udp", "any", "icmp" if family_nets is nets4 else "icmpv6"])
            ported = proto in ("tcp", "udp", "any")
            rules.append(
                rule(
                    rule_id,
                    src_ip=rng.choice(family_nets),
                    dst_ip=rng.choice(family_nets),
                    protocol=proto,
                    action=rng.choice(["allow", "deny", "log"]),
                    priority=rng.choice([1, 100, 100, 200]),
                    direction=rng.choice(["ingress", "egress", "any"]),
                    dst_port=rng.choice([0, 80, "70-90", "0-65535"]) if ported else 0,
                    src_port=rng.choice([0, 0, "1000-65535"]) if ported else 0,
                )
            )
        ps = policy(*rules, default=rng.choice(["allow", "deny"]))
        for _ in range(20):
            if rng.random() < 0.6:
                src, dst = rng.choice([A4, B4, "192.168.1.1"]), rng.choice([A4, B4])
                number = rng.choice([6, 17, 1, 47])
            else:
                src, dst = rng.choice([A6, B6, "fd00::1"]), rng.choice([A6, B6])
                number = rng.choice([6, 17, 58, 47])
            ports = (rng.choice([0, 80, 75, 1500]), rng.choice([0, 80, 75, 91]))
            if number not in (6, 17):
                ports = (0, 0) if number == 47 else (ports[0], ports[0])
            pkt = Packet.of(src, dst, number, *ports, rng.choice(["ingress", "egress"]))
            assert judge(ps, pkt) == _sorted_first_match(ps, pkt)
