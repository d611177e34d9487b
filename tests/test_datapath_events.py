"""The classifier in the real kernel, layouts and flow events: the maps as the kernel has them
match the Python packing (the pin layout version against the header: tests/test_layout.py), and
the flow events' records (struct ms_event, streamer.datapath.layout's EVENT) carry what happened,
through BPF_PROG_TEST_RUN on the session's classifier; expected verdicts are written out by hand
and also checked against the reference model (streamer/datapath/reference.py), so both agree
with contract §2."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from support.bpf import kernel_retval as run
from support.classifier import DROP, PASS, R, install, pk
from support.packets import frame

from streamer.datapath.bindings import map_info
from streamer.datapath.compiler import compile_policy, pack_rule_key, pack_rule_val, pack_shape
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import (
    BANK,
    COUNTERS,
    EVENT,
    FRAG_KEY,
    FRAG_VAL,
    REAPED,
    RULE_CTR,
    SESS_KEY,
    SESS_VAL,
    SETTINGS,
)
from streamer.datapath.reference import Packet
from streamer.policy.model import parse_policy_document

if TYPE_CHECKING:
    from support.bpf import EventSink


# ---- layout --------------------------------------------------------------------------------


def test_map_layouts_match_python_packing(dp: Datapath) -> None:
    """The maps' key and value sizes as the kernel has them (bcc compiled bpf/classifier.h)
    against streamer's struct packing; the fields' offsets are held against the header by
    tests/test_layout.py."""

    def sizes(name: str) -> tuple[int, int]:
        info = map_info(dp._maps.fds[name])
        return info.key_size, info.value_size

    assert sizes("sessions") == (SESS_KEY.size, SESS_VAL.size)
    assert SESS_VAL.offset("pkts_orig") == 32 and SESS_VAL.offset("pkts_reply") == 96
    pol = parse_policy_document({"policies": [R(1)]})
    c = compile_policy(pol, 8)
    entry = next(iter(c.v4.entries[0].values()))
    val = len(pack_rule_val(entry, 1))
    assert sizes("rules4") == (len(pack_rule_key(4, 0, (1, 6, 0, 0, 0, 0))), val) == (16, 48)
    assert sizes("rules6") == (len(pack_rule_key(6, 0, (1, 6, 0, 0, 0, 0))), val) == (40, 48)
    assert sizes("shapes") == (4, len(pack_shape(c.v4.shapes[0], 1))) == (4, 56)
    assert sizes("banks") == (4, BANK.size) == (4, 16)
    assert sizes("rule_stats") == (4, RULE_CTR.size) == (4, 48)
    assert sizes("counters") == (4, COUNTERS.size) == (4, 48 * 8)
    assert sizes("frags") == (FRAG_KEY.size, FRAG_VAL.size)
    assert sizes("reaped") == (4, REAPED.size)
    assert sizes("settings") == (4, SETTINGS.size)
    assert EVENT.size == 88


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
        _staged_verdict,
        _staged_rule_id,
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
