"""The classifier in the real kernel, sessions and counters: replies share the verdict, a policy
change cuts an established flow, re-judging in the flow's original direction, per-direction
packets and bytes, the IPv6 session key; counters and rule counters against what was sent,
through BPF_PROG_TEST_RUN on the session's classifier; expected verdicts are written out by hand
and also checked against the reference model (streamer/datapath/reference.py), so both agree
with contract §2."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from support.bpf import kernel_retval as run
from support.classifier import DROP, PASS, Delta, R, install, pb, pk
from support.packets import ETH_P_ARP, ETH_P_IP, arp, eth, ipv4

from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.datapath.reference import Packet, StatefulReference, Verdict, judge
from streamer.policy.model import parse_policy_document

if TYPE_CHECKING:
    from support.bpf import EventSink


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
    assert pb(dp.rule_counters(999)) == (0, 0)  # unknown rule: zeros


def test_rule_counters_start_at_zero_and_survive_unrelated_changes(dp: Datapath) -> None:
    install(dp, "allow", R(21, protocol="udp"))
    p = pk("10.0.0.1", "10.0.0.2", "udp", 1, 2, length=64)
    assert run(dp, p) == PASS
    assert pb(dp.rule_counters(21)) == (1, 64)
    # rule 21 stays in the set: its counters go on
    install(dp, "allow", R(21, protocol="udp"), R(22, protocol="tcp"))
    assert pb(dp.rule_counters(22)) == (0, 0)
    assert run(dp, p) == PASS
    assert pb(dp.rule_counters(21)) == (2, 128)
    # removed, then added back: a new rule, counting from zero
    install(dp, "allow", R(22, protocol="tcp"))
    assert pb(dp.rule_counters(21)) == (0, 0)
    install(dp, "allow", R(21, protocol="udp"))
    assert pb(dp.rule_counters(21)) == (0, 0)
