"""Session state in the kernel: the TCP state machine, idle timeouts and the reaper, a full
table, related ICMP errors and fragments; first through BPF_PROG_TEST_RUN against the reference
model (with a clock), then with real traffic across the lab's veth pair: a UDP datagram large
enough to fragment to an allowed and a denied port (IPv4 and IPv6), a real TCP connection's
life (handshake, data, FIN both ways; RST), idle expiry, and a bounded SYN flood from the peer
moving the half-open and new-flow counters.
"""

from __future__ import annotations

import secrets
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bpf import loaded_datapath, unique_instance
from support.diffkit import Harness
from support.netutil import echo_server, link_mac, receive_all, send_frames, wait_until
from support.packets import (
    ETH_P_IP,
    ETH_P_IPV6,
    eth,
    fragments4,
    fragments6,
    icmp,
    icmpv6,
    ipv4,
    ipv6,
    tcp,
    udp,
)

from streamer.datapath.attach import detach
from streamer.datapath.bindings import test_run as bpf_test_run
from streamer.datapath.compiler import compile_policy
from streamer.datapath.config import DatapathConfig
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.reference import Decision, StatefulReference, Timeouts, Verdict
from streamer.lab.lab import Lab
from streamer.lab.netns import netns_socket
from streamer.policy.model import PolicySet, parse_policy_document

A4, B4 = "10.1.0.1", "10.2.0.2"
A6, B6 = "2001:db8:1::1", "2001:db8:2::2"


def _policy(default: str, *rules: dict[str, object]) -> PolicySet:
    return parse_policy_document({"default_action": default, "policies": list(rules)})


# Egress web allowed (we are A, the client), everything else denied.
WEB_OUT = _policy(
    "deny",
    {"rule_id": 1, "protocol": "tcp", "dst_port": 80, "direction": "egress", "action": "allow"},
    {"rule_id": 2, "protocol": "udp", "dst_port": 53, "direction": "egress", "action": "allow"},
)


def _t4(src: str, dst: str, sport: int, dport: int, flags: str) -> bytes:
    return eth(ipv4(src, dst, 6, tcp(sport, dport, flags, src=src, dst=dst)), ETH_P_IP)


def _state(dp: Datapath, dport: int) -> str:
    states = [s.tcp_state for s in dp.sessions() if s.dst_port == dport and s.protocol == 6]
    assert len(states) == 1, states
    return states[0]


@pytest.fixture
def harness(datapath: Datapath) -> Iterator[Harness]:
    h = Harness(datapath, WEB_OUT)
    try:
        yield h
    finally:
        h.close()


# ---- the TCP state machine ------------------------------------------------------------------


def test_tcp_life_through_every_state(harness: Harness) -> None:
    dp = harness.dp

    def out(flags: str) -> Decision:
        return harness.send(_t4(A4, B4, 40000, 80, flags), "egress")

    def back(flags: str) -> Decision:
        return harness.send(_t4(B4, A4, 80, 40000, flags), "ingress")

    steps = [
        (out, "S", "SYN_SENT"),
        (back, "SA", "SYN_RECV"),
        (out, "A", "ESTABLISHED"),
        (out, "PA", "ESTABLISHED"),
        (back, "PA", "ESTABLISHED"),
        (out, "FA", "FIN_WAIT"),
        (back, "A", "CLOSE_WAIT"),
        (back, "FA", "LAST_ACK"),
        (out, "A", "TIME_WAIT"),
        (back, "A", "TIME_WAIT"),  # a late duplicate keeps it
    ]
    before = dp.counters()
    for send, flags, state in steps:
        assert send(flags).passes
        assert _state(dp, 80) == state, (flags, state)
    c = dp.counters()
    assert c["closed_sessions"] - before["closed_sessions"] == 1
    assert c["half_open_opened"] - before["half_open_opened"] == 1
    assert c["half_open_left"] - before["half_open_left"] == 1
    assert c["half_open_sessions"] == 0
    # a new SYN on the finished connection starts a new flow on the same tuple
    assert out("S").passes
    assert _state(dp, 80) == "SYN_SENT"
    assert dp.counters()["renewed_closed"] - before["renewed_closed"] == 1
    # RST closes at once, from either side
    assert back("R").verdict is Verdict.ALLOW
    assert _state(dp, 80) == "CLOSED"
    harness.check("TCP life")


def test_unknown_tcp_packet_is_judged_as_a_new_flow(harness: Harness) -> None:
    """Mid-connection packets the table does not know (after a restart or expiry): judged in
    their own direction. Ours (egress to port 80) pass and are picked up as ESTABLISHED; the
    server's (ingress from port 80) are a new, denied flow."""
    assert harness.send(_t4(A4, B4, 40001, 80, "PA"), "egress").passes
    assert _state(harness.dp, 80) == "ESTABLISHED"
    assert not harness.send(_t4(B4, A4, 80, 40002, "PA"), "ingress").passes
    harness.check("unknown TCP")


def test_ipv6_tcp_states_and_reference(harness: Harness) -> None:
    for sport, flags in ((41000, ["S", "SA", "A", "R"]), (41001, ["S", "R"]), (41002, ["A"])):
        for i, f in enumerate(flags):
            if i % 2 == 0:
                seg = tcp(sport, 80, f, src=A6, dst=B6)
                harness.send(eth(ipv6(A6, B6, 6, seg), ETH_P_IPV6), "egress")
            else:
                seg = tcp(80, sport, f, src=B6, dst=A6)
                harness.send(eth(ipv6(B6, A6, 6, seg), ETH_P_IPV6), "ingress")
    harness.check("IPv6 TCP")
    assert harness.dp.counters()["half_open_sessions"] == 0


# ---- timeouts and the reaper ----------------------------------------------------------------


def test_idle_sessions_expire_and_are_reaped(datapath: Datapath) -> None:
    short = Timeouts(
        udp=0.2, udp_stream=0.2, tcp_syn_sent=0.2, tcp_time_wait=0.2, tcp_established=30.0
    )
    h = Harness(datapath, WEB_OUT, timeouts=short)
    dp = h.dp
    try:
        now = dp.now_ns()
        ref = h.ref
        dns = eth(ipv4(A4, B4, 17, udp(5000, 53)), ETH_P_IP)
        dns_reply = eth(ipv4(B4, A4, 17, udp(53, 5000)), ETH_P_IP)
        web = _t4(A4, B4, 40003, 80, "A")
        for frame, d in ((dns, "egress"), (dns_reply, "ingress"), (web, "egress")):
            assert ref.process_frame(frame, d, now=now).passes  # type: ignore[arg-type]
            assert bpf_test_run(prog_fd(dp, d), frame)[0] == 0
        assert dp.counters()["active_sessions"] == 2
        time.sleep(0.5)
        # the reply of the expired DNS flow is a new flow now: ingress, denied
        now = dp.now_ns()
        assert not ref.process_frame(dns_reply, "ingress", now=now).passes
        assert bpf_test_run(prog_fd(dp, "ingress"), dns_reply)[0] == 2
        c = dp.counters()
        assert c["renewed_expired"] - h.base["renewed_expired"] == 1
        # the reaper: the denied reply's session (UDP, 0.2 s) and not the established one
        assert dp.reap_expired(now) == {"expired": 0, "closed": 0, "fragments": 0}
        assert dp.reap_expired(now + 10**9) == {"expired": 1, "closed": 0, "fragments": 0}
        assert ref.expire(now + 10**9) == (1, 0)
        assert [s.dst_port for s in dp.sessions()] == [80]
        c = dp.counters()
        assert c["active_sessions"] == 1 == len(list(dp.sessions()))
        assert c["expired_sessions"] - h.base["expired_sessions"] == 2
        # a finished connection lingers for tcp_time_wait, then counts as closed
        for f, d, src, dst, sp, dpt in (
            ("FA", "egress", A4, B4, 40003, 80),
            ("FA", "ingress", B4, A4, 80, 40003),
            ("A", "egress", A4, B4, 40003, 80),
        ):
            assert bpf_test_run(prog_fd(dp, d), _t4(src, dst, sp, dpt, f))[0] == 0
        assert _state(dp, 80) == "TIME_WAIT"
        assert dp.reap_expired(dp.now_ns() + 10**9) == {"expired": 0, "closed": 1, "fragments": 0}
        assert dp.counters()["active_sessions"] == 0
    finally:
        h.close()


def test_fragment_memory_expires(datapath: Datapath) -> None:
    h = Harness(datapath, WEB_OUT, timeouts=Timeouts(fragment=0.2))
    try:
        seg = udp(5001, 53, bytes(40), src=A4, dst=B4)
        first, *rest = [eth(f, ETH_P_IP) for f in fragments4(A4, B4, 17, seg, 24, 77)]
        assert h.send(first, "egress").passes
        time.sleep(0.5)
        now = h.dp.now_ns()
        want = h.ref.process_frame(rest[0], "egress", now=now)
        assert want.verdict is Verdict.DROP_FRAGMENT
        assert bpf_test_run(prog_fd(h.dp, "egress"), rest[0])[0] == 2
        assert h.dp.reap_expired()["fragments"] == 1
        assert h.dp.map_fill()["fragments"].entries == 0
    finally:
        h.close()


# A first fragment is judged by its own header, whatever came before with its IP ID; later
# fragments follow the newest first. Datagrams A (allowed: egress UDP 53) and D (denied: 54)
# share addresses, protocol and ID; each order says which of the six pieces pass.
FRAG_ORDERS = {
    "deny then allow": (("D0", "D1", "D2", "A0", "A1", "A2"), "xxxppp"),
    "allow then deny": (("A0", "A1", "A2", "D0", "D1", "D2"), "pppxxx"),
    # D's later pieces follow A's first: they pass, but D has no first at the receiver
    "deny's first, allow's first, the rest": (("D0", "A0", "A1", "A2", "D1", "D2"), "xppppp"),
    # A's later pieces follow D's first (the newest): dropped with it
    "allow's first, deny's first, the rest": (("A0", "D0", "A1", "A2", "D1", "D2"), "pxxxxx"),
}


def _frag_pieces(family: int, ident: int) -> dict[str, bytes]:
    """The three fragments of an allowed (A) and a denied (D) UDP datagram with one ID."""
    out = {}
    for name, dport in (("A", 53), ("D", 54)):
        if family == 4:
            seg = udp(5300, dport, bytes(40), src=A4, dst=B4)
            frames = [eth(f, ETH_P_IP) for f in fragments4(A4, B4, 17, seg, 16, ident)]
        else:
            seg = udp(5300, dport, bytes(40), src=A6, dst=B6)
            frames = [eth(f, ETH_P_IPV6) for f in fragments6(A6, B6, 17, seg, 16, ident)]
        out.update({f"{name}{i}": f for i, f in enumerate(frames)})
    return out


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
@pytest.mark.parametrize("order", list(FRAG_ORDERS))
def test_a_first_fragment_is_judged_by_its_own_header(
    harness: Harness, family: int, order: str
) -> None:
    names, want = FRAG_ORDERS[order]
    pieces = _frag_pieces(family, 4000 + list(FRAG_ORDERS).index(order))
    got = "".join("p" if harness.send(pieces[n], "egress").passes else "x" for n in names)
    assert got == want, (order, got)
    harness.check(f"fragment order {order!r}, IPv{family}")
    assert harness.ref.counters["fragments_replaced"] > 0


# ---- a full session table -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dp() -> Iterator[Datapath]:
    """A classifier whose session table holds 16 flows."""
    cfg = DatapathConfig(instance=unique_instance("tiny"), session_entries=16)
    with loaded_datapath(cfg) as dp:
        yield dp


def test_full_table_keeps_every_verdict_right(tiny_dp: Datapath) -> None:
    """Beyond 16 flows nothing is cached and nothing is evicted: each packet of an uncached
    flow is judged alone (a reply of one, under default deny, is a new denied flow), exactly
    as the model says, and active_sessions stays exact."""
    pol = _policy(
        "deny",
        {"rule_id": 1, "protocol": "udp", "dst_port": 53, "direction": "egress", "action": "allow"},
        {"rule_id": 2, "protocol": "tcp", "dst_port": 22, "action": "deny", "priority": 300},
        {"rule_id": 3, "protocol": "tcp", "dst_port": 80, "action": "log"},
    )
    h = Harness(tiny_dp, pol)
    try:
        for round_ in range(3):
            for i in range(40):
                src = f"10.0.{round_}.{i + 1}"
                q = eth(ipv4(src, B4, 17, udp(1000 + i, 53)), ETH_P_IP)
                r = eth(ipv4(B4, src, 17, udp(53, 1000 + i)), ETH_P_IP)
                h.send(q, "egress")
                h.send(r, "ingress")
                h.send(_t4(src, B4, 2000 + i, [22, 80][i % 2], "S"), "egress")
            h.check(f"full table, round {round_}")
        c = tiny_dp.counters()
        assert c["active_sessions"] == 16 == len(list(tiny_dp.sessions()))
        assert c["session_create_failed"] > 0
        assert tiny_dp.map_fill()["sessions"].ratio == 1.0
        p = tiny_dp.pressure()
        assert p["fill"]["sessions"]["ratio"] == 1.0 and p["drops"]["pressure"] == 0
        drops = tiny_dp.drops_by_reason()
        assert drops["policy"] == c["denied_packets"] > 0 and drops["pressure"] == 0
        assert tiny_dp.session_gauges()["active_sessions"] == 16
        # freed room is used again
        tiny_dp.clear_sessions()
        h.ref.clear_sessions()
        assert tiny_dp.counters()["active_sessions"] == 0
        h.send(eth(ipv4(A4, B4, 17, udp(999, 53)), ETH_P_IP), "egress")
        assert tiny_dp.counters()["active_sessions"] == 1
    finally:
        h.close()


# ---- related ICMP -----------------------------------------------------------------------------


def test_related_icmp_passes_under_default_deny(harness: Harness) -> None:
    web4 = ipv4(A4, B4, 6, tcp(40010, 80, "S"))
    web6 = ipv6(A6, B6, 6, tcp(40010, 80, "S"))
    harness.send(eth(web4, ETH_P_IP), "egress")
    harness.send(eth(web6, ETH_P_IPV6), "egress")
    need_frag = eth(ipv4("10.9.9.9", A4, 1, icmp(3, 4, 0, 1400, web4[:28])), ETH_P_IP)
    too_big = eth(ipv6("2001:db8:9::9", A6, 58, icmpv6(2, 0, 0, 1280, web6[:48])), ETH_P_IPV6)
    assert harness.send(need_frag, "ingress").verdict is Verdict.PASS_RELATED
    assert harness.send(too_big, "ingress").verdict is Verdict.PASS_RELATED
    # about a flow that does not exist, or was denied: judged by the policy (default deny)
    ssh4 = ipv4(A4, B4, 6, tcp(40011, 22, "S"))
    harness.send(eth(ssh4, ETH_P_IP), "egress")
    other = eth(ipv4("10.9.9.9", A4, 1, icmp(3, 4, 0, 1400, ssh4[:28])), ETH_P_IP)
    assert harness.send(other, "ingress").verdict is Verdict.DENY
    # an echo request is not an error: judged by the policy
    assert not harness.send(
        eth(ipv4("10.9.9.9", A4, 1, icmp(8, 0, 1, 1)), ETH_P_IP), "ingress"
    ).passes
    harness.check("related ICMP")


# ---- real traffic -----------------------------------------------------------------------------

P_TCP, P_UDP_OK, P_UDP_NO = 18080, 18053, 18054


@pytest.fixture(scope="module")
def lab_dp(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Datapath]:
    """A classifier attached to the lab's host end: from the peer, TCP to P_TCP and UDP to
    P_UDP_OK are allowed (ingress), everything else denied."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = DatapathConfig(
        instance=unique_instance("lab"), run_dir=Path(run_dir), session_entries=4096
    )
    pol = _policy(
        "deny",
        {
            "rule_id": 1,
            "protocol": "tcp",
            "dst_port": P_TCP,
            "direction": "ingress",
            "action": "allow",
        },
        {
            "rule_id": 2,
            "protocol": "udp",
            "dst_port": P_UDP_OK,
            "direction": "ingress",
            "action": "allow",
        },
    )
    with loaded_datapath(cfg) as dp:
        try:
            dp.apply(compile_policy(pol, cfg.max_shapes))
            dp.attach(module_lab.host_if, module_lab.host_ns)
            yield dp
        finally:
            detach(module_lab.host_if, module_lab.host_ns, cfg.run_dir)


def _receive_big(lab: Lab, family: int, port: int, size: int) -> bool:
    """Send one `size`-byte UDP datagram from the peer to the host; True if it arrived."""
    addr = lab.host_v4 if family == socket.AF_INET else lab.host_v6
    with (
        netns_socket(lab.host_ns, family, socket.SOCK_DGRAM) as rx,
        netns_socket(lab.peer_ns, family, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((addr, port))
        rx.settimeout(1.0)
        payload = uuid.uuid4().bytes * (size // 16)
        tx.sendto(payload, (addr, port))
        try:
            return rx.recv(65535) == payload
        except OSError:
            return False


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_fragmented_udp_delivered_only_to_the_allowed_port(
    lab_dp: Datapath, module_lab: Lab, family: int
) -> None:
    before = lab_dp.counters()
    assert _receive_big(module_lab, family, P_UDP_OK, 4000)
    assert not _receive_big(module_lab, family, P_UDP_NO, 4000)
    c = lab_dp.counters()
    # 4000 bytes over a 1500-byte MTU: three fragments a datagram, two following their first
    assert c["fragments_first"] - before["fragments_first"] == 2
    assert c["fragments_followed"] - before["fragments_followed"] >= 4
    assert c["fragment_drops"] == before["fragment_drops"]
    assert c["denied_packets"] - before["denied_packets"] >= 3


# What reaches the listeners on P_UDP_OK and P_UDP_NO in each order of FRAG_ORDERS: A is
# whole at the receiver when its first and its later pieces all passed; D never is.
FRAG_DELIVERED = {
    "deny then allow": True,
    "allow then deny": True,
    "deny's first, allow's first, the rest": True,
    "allow's first, deny's first, the rest": False,
}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("order", list(FRAG_ORDERS))
def test_real_fragments_reusing_an_ip_id(
    lab_dp: Datapath, module_lab: Lab, family: int, order: str
) -> None:
    """Crafted fragments of two datagrams with one IP ID, from the peer's interface to the
    host's stack: the allowed one is delivered (unless the denied first came between its
    first and its later pieces), the denied one never."""
    lab = module_lab
    names, _ = FRAG_ORDERS[order]
    v4 = family == socket.AF_INET
    src, dst = (lab.peer_v4, lab.host_v4) if v4 else (lab.peer_v6, lab.host_v6)
    ident = secrets.randbelow(0xFFFF) + 1
    payloads = {"A": secrets.token_bytes(1200), "D": secrets.token_bytes(1200)}
    frames: dict[str, bytes] = {}
    macs = {
        "dst_mac": link_mac(lab.host_ns, lab.host_if),
        "src_mac": link_mac(lab.peer_ns, lab.peer_if),
    }
    for name, port in (("A", P_UDP_OK), ("D", P_UDP_NO)):
        seg = udp(40000, port, payloads[name], src=src, dst=dst)
        if v4:
            ips = fragments4(src, dst, 17, seg, 512, ident)
        else:
            ips = fragments6(src, dst, 17, seg, 512, ident)
        ethertype = ETH_P_IP if v4 else ETH_P_IPV6
        frames.update({f"{name}{i}": eth(f, ethertype, **macs) for i, f in enumerate(ips)})
    before = lab_dp.counters()
    with (
        netns_socket(lab.host_ns, family, socket.SOCK_DGRAM) as ok,
        netns_socket(lab.host_ns, family, socket.SOCK_DGRAM) as no,
    ):
        ok.bind((dst, P_UDP_OK))
        no.bind((dst, P_UDP_NO))
        send_frames(lab.peer_ns, lab.peer_if, [frames[n] for n in names])
        got = {name: receive_all(sock, 0.5) for name, sock in (("A", ok), ("D", no))}
    assert got["D"] == []
    assert got["A"] == ([payloads["A"]] if FRAG_DELIVERED[order] else []), order
    c = lab_dp.counters()
    assert c["fragments_replaced"] - before["fragments_replaced"] == 1
    assert c["fragment_drops"] == before["fragment_drops"]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_real_port_unreachable_reaches_the_sender(
    lab_dp: Datapath, module_lab: Lab, family: int
) -> None:
    """UDP to an allowed port where nothing listens: the host's ICMP port unreachable (egress,
    and no rule allows ICMP) passes as related, so the peer's socket learns at once."""
    lab = module_lab
    addr = lab.host_v4 if family == socket.AF_INET else lab.host_v6
    before = lab_dp.counters()["related_passed"]
    with netns_socket(lab.peer_ns, family, socket.SOCK_DGRAM) as s:
        s.connect((addr, P_UDP_OK))
        s.settimeout(2.0)
        s.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            s.recv(100)
    assert lab_dp.counters()["related_passed"] - before == 1


def test_real_tcp_connection_life(lab_dp: Datapath, module_lab: Lab) -> None:
    lab = module_lab
    before = lab_dp.counters()
    with echo_server(lab.host_ns, tcp_ports=[P_TCP]):
        sock = netns_socket(lab.peer_ns, socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(2.0)
            sock.connect((lab.host_v4, P_TCP))
            sport = sock.getsockname()[1]
            sock.sendall(b"hello\n")
            assert sock.recv(100) == b"hello\n"

            def state() -> str:
                got = [s.tcp_state for s in lab_dp.sessions() if s.src_port == sport]
                return got[0] if got else ""

            assert state() == "ESTABLISHED"
            sock.shutdown(socket.SHUT_WR)  # our FIN; the echo server closes in turn
            assert sock.recv(100) == b""
            assert wait_until(lambda: state() == "TIME_WAIT", timeout=3.0), state()
        # RST: close with a zero linger
        rst = netns_socket(lab.peer_ns, socket.AF_INET, socket.SOCK_STREAM)
        rst.settimeout(2.0)
        rst.connect((lab.host_v4, P_TCP))
        rport = rst.getsockname()[1]
        rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rst.close()
        assert wait_until(
            lambda: [s.tcp_state for s in lab_dp.sessions() if s.src_port == rport] == ["CLOSED"],
            timeout=3.0,
        )
    c = lab_dp.counters()
    assert c["closed_sessions"] - before["closed_sessions"] == 2
    assert c["half_open_sessions"] == 0


def test_real_idle_expiry(lab_dp: Datapath, module_lab: Lab) -> None:
    lab = module_lab
    lab_dp.set_timeouts(Timeouts(udp=0.3, udp_stream=0.3))
    try:
        assert _receive_big(lab, socket.AF_INET, P_UDP_OK, 64)
        n = lab_dp.counters()["active_sessions"]
        assert n >= 1
        time.sleep(0.8)
        got = lab_dp.reap_expired()
        assert got["expired"] >= 1
        assert lab_dp.counters()["active_sessions"] == n - got["expired"] - got["closed"]
        assert not [s for s in lab_dp.sessions() if s.protocol == 17]
    finally:
        lab_dp.set_timeouts(lab_dp.config.timeouts)


def test_syn_flood_from_the_peer_moves_the_pressure_counters(
    lab_dp: Datapath, module_lab: Lab
) -> None:
    """300 SYNs from distinct ports to a denied port: 300 new flows, all half-open."""
    lab = module_lab
    before = lab_dp.counters()
    n = 300
    with netns_socket(lab.peer_ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        for i in range(n):
            seg = tcp(30000 + i, 9, "S", src=lab.peer_v4, dst=lab.host_v4, seq=i)
            s.sendto(seg, (lab.host_v4, 0))
    assert wait_until(
        lambda: lab_dp.counters()["syn_new_sessions"] - before["syn_new_sessions"] >= n,
        timeout=3.0,
    )
    c = lab_dp.counters()
    assert c["half_open_sessions"] - before["half_open_sessions"] == n
    assert c["half_open_opened"] - before["half_open_opened"] == n
    assert c["denied_packets"] - before["denied_packets"] >= n
    p = lab_dp.pressure()
    assert p["half_open_sessions"] >= n
    assert p["fill"]["sessions"]["entries"] == c["active_sessions"]
    # the flood's sessions go when the reaper sees them past the SYN_SENT timeout
    reaped = lab_dp.reap_expired(lab_dp.now_ns() + 121 * 10**9)
    assert reaped["expired"] >= n
    assert lab_dp.counters()["half_open_sessions"] == 0


def test_reference_clock_model_matches_kernel_on_expiry() -> None:
    """The model alone: expiry is strictly 'idle longer than the timeout'."""
    ref = StatefulReference(WEB_OUT, timeouts=Timeouts(udp=1.0))
    q = eth(ipv4(A4, B4, 17, udp(5000, 53)), ETH_P_IP)
    assert ref.process_frame(q, "egress", now=0).passes
    assert ref.expire(10**9) == (0, 0)
    assert ref.expire(10**9 + 1) == (1, 0)
