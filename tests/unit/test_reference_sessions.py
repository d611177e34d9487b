"""The reference model (`streamer.datapath.reference`), state: sessions and re-judging, the
TCP state machine, timeouts, fragments and related ICMP."""

from __future__ import annotations

from dataclasses import replace

import pytest
from support.packets import ETH_P_ARP, ETH_P_IP, arp, eth, frame, icmp, ipv4, udp
from support.refmodel import A4, A6, B4, B6, policy, rule, tcp4

from streamer.datapath.reference import (
    Decision,
    Packet,
    StatefulReference,
    Verdict,
    flow_key,
    judge,
)

# --- sessions -------------------------------------------------------------------------


def test_flow_key_is_direction_independent() -> None:
    out = tcp4(40000, 80, "egress")
    assert flow_key(out) == flow_key(out.reply())
    assert flow_key(out) != flow_key(tcp4(40001, 80, "egress"))
    assert flow_key(out) != flow_key(replace(out, ifindex=2))
    assert flow_key(out) != flow_key(replace(out, proto=17))
    ping = Packet.of(A6, B6, "icmpv6", 77, 77)
    assert flow_key(ping) == flow_key(ping.reply())
    same_host = Packet.of(A4, A4, "udp", 5, 5)
    assert flow_key(same_host) == flow_key(same_host.reply())


def test_reply_shares_allow_under_default_deny() -> None:
    web = rule(1, protocol="tcp", dst_port=80, direction="egress")
    ref = StatefulReference(policy(web, default="deny"))
    syn = tcp4(40000, 80, "egress")
    assert ref.process(syn) == Decision(Verdict.ALLOW, web)
    # the reply alone would be denied (ingress, dport 40000) but shares the flow's verdict
    assert judge(ref.policy, syn.reply()).verdict is Verdict.DENY
    assert ref.process(syn.reply()) == Decision(Verdict.ALLOW, web)
    assert ref.process(syn) == Decision(Verdict.ALLOW, web)
    session = ref.sessions[flow_key(syn)]
    assert (session.origin, session.packets, session.generation) == (syn, 3, 0)
    # an unrelated flow from the other side is judged on its own
    assert ref.process(tcp4(80, 40001, "ingress")).verdict is Verdict.DENY
    assert len(ref.sessions) == 2


def test_denied_flow_stays_denied_both_ways() -> None:
    no_ssh = rule(5, protocol="tcp", dst_port=22, action="deny")
    ref = StatefulReference(policy(no_ssh))
    first = tcp4(5555, 22, "ingress")
    assert ref.process(first) == Decision(Verdict.DENY, no_ssh)
    assert ref.process(first.reply()) == Decision(Verdict.DENY, no_ssh)


def test_first_packet_in_either_direction_decides() -> None:
    # the first packet seen is an ingress one: its verdict holds for the egress side too
    only_in = rule(1, direction="ingress", action="allow")
    ref = StatefulReference(policy(only_in, default="deny"))
    pkt = Packet.of(B4, A4, "udp", 53, 5353, "ingress")
    assert ref.process(pkt).verdict is Verdict.ALLOW
    assert ref.process(pkt.reply()).verdict is Verdict.ALLOW


def test_new_policy_cuts_live_flow_at_next_packet() -> None:
    ref = StatefulReference(policy())
    syn = tcp4(40000, 22, "ingress")
    assert ref.process(syn).verdict is Verdict.ALLOW
    cut = rule(9, protocol="tcp", dst_port=22, action="deny")
    ref.set_policy(policy(cut))
    assert ref.generation == 1
    assert ref.process(syn.reply()) == Decision(Verdict.DENY, cut)
    assert ref.process(syn) == Decision(Verdict.DENY, cut)
    ref.set_policy(policy())
    assert ref.process(syn).verdict is Verdict.ALLOW


def test_rejudged_on_original_packet_not_current_one() -> None:
    # Allowed only as the original (egress, to port 80); the reply alone would be denied.
    web = rule(1, protocol="tcp", dst_port=80, direction="egress")
    ref = StatefulReference(policy(web, default="deny"))
    syn = tcp4(40000, 80, "egress")
    ref.process(syn)
    ref.set_policy(policy(web, rule(2, protocol="udp"), default="deny"))
    assert ref.process(syn.reply()) == Decision(Verdict.ALLOW, web)

    # A rule that matches only the reply's shape must not cut the flow.
    reply_shape = rule(3, protocol="tcp", src_port=80, direction="ingress", action="deny")
    ref.set_policy(policy(web, reply_shape, default="deny"))
    assert judge(ref.policy, syn.reply()).verdict is Verdict.DENY
    assert ref.process(syn.reply()) == Decision(Verdict.ALLOW, web)

    # A rule that matches the original cuts it, whichever direction comes next.
    orig_shape = rule(4, protocol="tcp", dst_port=80, direction="egress", action="deny")
    ref.set_policy(policy(web, orig_shape, default="deny"))
    assert ref.process(syn.reply()) == Decision(Verdict.DENY, orig_shape)


def test_clear_sessions() -> None:
    web = rule(1, protocol="tcp", dst_port=80, direction="egress")
    ref = StatefulReference(policy(web, default="deny"))
    syn = tcp4(40000, 80, "egress")
    ref.process(syn)
    ref.clear_sessions()
    assert ref.sessions == {}
    # without its session the reply is a new flow, judged on itself
    assert ref.process(syn.reply()).verdict is Verdict.DENY


def test_process_frame() -> None:
    ref = StatefulReference(policy(default="deny"))
    assert ref.process_frame(eth(arp(), ETH_P_ARP), "ingress").verdict is Verdict.PASS_L2
    assert ref.process_frame(b"\0" * 10, "ingress").verdict is Verdict.DROP_PARSE
    assert ref.sessions == {}
    assert ref.process_frame(frame(tcp4()), "ingress").verdict is Verdict.DENY
    assert len(ref.sessions) == 1


# --- state: the TCP state machine, timeouts, fragments, related ICMP (issue 5) ------------


def test_tcp_state_machine_transitions() -> None:
    from streamer.datapath.layout import TCP_STATE_NAMES
    from streamer.datapath.reference import tcp_next

    def run(steps: list[tuple[int, str]]) -> list[str]:
        state, fins, out = 0, 0, []
        for d, flags in steps:
            bits = sum({"F": 1, "S": 2, "R": 4, "A": 16}[c] for c in flags)
            state, fins = tcp_next(state, d, bits, fins)
            out.append(TCP_STATE_NAMES[state])
        return out

    assert run([(0, "S"), (1, "SA"), (0, "A"), (0, "FA"), (1, "A"), (1, "FA"), (0, "A")]) == [
        "SYN_SENT",
        "SYN_RECV",
        "ESTABLISHED",
        "FIN_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "TIME_WAIT",
    ]
    # the responder closes first; both FINs before any ACK
    assert run([(0, "A"), (1, "FA"), (0, "FA"), (1, "A")])[-2:] == ["LAST_ACK", "TIME_WAIT"]
    assert run([(0, "S"), (1, "R")]) == ["SYN_SENT", "CLOSED"]
    assert run([(0, "S"), (0, "SA")]) == ["SYN_SENT", "SYN_SENT"]  # our own SYN/ACK: no answer
    assert run([(0, "")]) == ["NONE"]
    assert run([(0, "S"), (1, "SA"), (0, "A"), (0, "R"), (0, "A"), (1, "F")])[-1] == "CLOSED"


def test_timeouts() -> None:
    from streamer.datapath.reference import Timeouts

    t = Timeouts()
    ns = t.by_class_ns()
    assert len(ns) == 16 and ns[3] == 432_000 * 10**9 and ns[9] == 30 * 10**9
    assert Timeouts.uniform(2.5).by_class_ns()[12] == 2_500_000_000
    for bad in (0, -1, "x", 10**12):
        with pytest.raises(ValueError, match="tcp_close"):
            Timeouts(tcp_close=bad)  # type: ignore[arg-type]


def test_stateful_reference_fragments_and_related() -> None:
    from support.packets import fragments4

    from streamer.datapath.reference import StatefulReference, dissect

    pol = policy(rule(1, protocol="udp", dst_port=53), default="deny")
    ref = StatefulReference(pol)
    seg = udp(1000, 53, bytes(40))
    first, *rest = [eth(f, ETH_P_IP) for f in fragments4("10.0.0.1", "10.0.0.2", 17, seg, 16, 5)]
    d = dissect(rest[0], "ingress")
    assert not isinstance(d, Decision) and d.frag == 2 and d.frag_off == 16
    assert ref.process_frame(rest[0], "ingress").verdict is Verdict.DROP_FRAGMENT
    assert ref.process_frame(first, "ingress").verdict is Verdict.ALLOW
    assert all(ref.process_frame(f, "ingress").verdict is Verdict.ALLOW for f in rest)
    assert ref.counters["fragment_drops_no_first"] == 1 and ref.counters["fragments_followed"] == 2
    quote = ipv4("10.0.0.1", "10.0.0.2", 17, udp(1000, 53))[:28]
    err = eth(ipv4("10.0.0.9", "10.0.0.1", 1, icmp(3, 4, 0, 1400, quote)), ETH_P_IP)
    assert ref.process_frame(err, "egress").verdict is Verdict.PASS_RELATED
    # to someone else than the quoted packet's sender: judged by the policy
    wrong = eth(ipv4("10.0.0.9", "10.0.0.3", 1, icmp(3, 4, 0, 1400, quote)), ETH_P_IP)
    assert ref.process_frame(wrong, "egress").verdict is Verdict.DENY


def test_stateful_reference_capacity() -> None:
    from streamer.datapath.reference import StatefulReference

    pol = policy(rule(1, protocol="udp", dst_port=53, direction="egress"), default="deny")
    ref = StatefulReference(pol, capacity=1)
    a = Packet.of("10.0.0.1", "10.0.0.2", "udp", 1000, 53, "egress")
    b = Packet.of("10.0.0.1", "10.0.0.2", "udp", 1001, 53, "egress")
    assert ref.process(a).passes and ref.process(a.reply()).passes
    assert ref.process(b).passes  # judged, not recorded
    assert not ref.process(b.reply()).passes  # so its reply is a new, denied flow
    assert ref.counters["session_create_failed"] == 2 and len(ref.sessions) == 1
