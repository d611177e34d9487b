"""Flow-event decoding (`streamer.events.decode`): round trips, what is no event, batches, and
rendering byte for byte what enrichment describes (tests/test_layout.py holds the event layout
against the C header)."""

from __future__ import annotations

import time
from dataclasses import replace

import orjson
import pytest
from support.events import tcp_rule, valid

from streamer.datapath.layout import EVENT, MS_NO_STAGED
from streamer.events.decode import (
    DecodeError,
    FlowEvent,
    decode,
    decode_batch,
    encode,
)
from streamer.events.enrich import Enricher
from streamer.events.fanout import flow_key
from streamer.policy.model import parse_policy_document

# ---- decode --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "src", "dst", "proto"),
    [
        (4, "10.0.0.7", "192.168.200.1", 6),
        (4, "0.0.0.0", "255.255.255.255", 17),
        (6, "2001:db8::10", "2001:db8:1::53", 17),
        (6, "fe80::1:0:0:1", "::ffff:10.1.2.3", 58),
        (6, "2001:db8:0:1:1:1:1:1", "::", 6),
        (4, "172.16.5.4", "172.16.5.5", 1),
    ],
)
def test_decode_round_trip(family: int, src: str, dst: str, proto: int) -> None:
    import ipaddress

    ev = FlowEvent(
        ts_ns=123456789012345,
        packets=7,
        bytes=9000,
        ifindex=42,
        rule_id=4294967295,
        generation=77,
        family=family,
        protocol=proto,
        direction="egress",
        verdict="log",
        src_ip=src,
        dst_ip=dst,
        src_port=65535 if proto in (6, 17) else 0,
        dst_port=1 if proto in (6, 17) else 0,
        tcp_flags=0x12,
        kind="update",
        staged_verdict="deny",
        staged_rule_id=4294967294,
    )
    raw = encode(ev)
    assert len(raw) == EVENT.size
    back = decode(raw)
    for field in FlowEvent.__slots__:
        if field.endswith("_ip"):
            # The same address, in canonical text (IPv4-mapped ones as ::ffff:a.b.c.d).
            text = getattr(back, field)
            assert ipaddress.ip_address(text) == ipaddress.ip_address(getattr(ev, field))
            if not text.startswith("::ffff:"):
                assert text == str(ipaddress.ip_address(text)), text
        else:
            assert getattr(back, field) == getattr(ev, field), field
    # The layout's fields by name read the same bytes the same way.
    r = EVENT.as_dict(raw)
    assert tuple(
        r[f] for f in ("ts", "packets", "bytes", "ifindex", "rule_id", "gen", "family", "proto")
    ) == (ev.ts_ns, 7, 9000, 42, 4294967295, 77, family, proto)
    assert tuple(r[f] for f in ("sport", "dport", "tcp_flags", "kind", "direction", "verdict")) == (
        ev.src_port,
        ev.dst_port,
        0x12,
        2,
        2,
        2,
    )
    assert (r["staged_verdict"], r["staged_rule_id"]) == (1, 4294967294)


def test_decode_staged_verdicts() -> None:
    """contract §6: MS_NO_STAGED (the views agree) is no staged verdict, whatever the rule
    field holds; a staged verdict with rule 0 is the staged default's; an unknown byte is
    "unknown"."""
    base = FlowEvent(
        1, 1, 60, 1, 5, 1, 4, 6, "ingress", "allow", "10.0.0.1", "10.0.0.2", 1, 2, 2, "new"
    )
    plain = encode(base)
    assert plain[EVENT.offset("staged_verdict")] == MS_NO_STAGED
    assert (decode(plain).staged_verdict, decode(plain).staged_rule_id) == (None, None)
    stray = bytearray(plain)
    stray[EVENT.offset("staged_rule_id")] = 9
    assert decode(bytes(stray)).staged_rule_id is None
    by_default = decode(encode(replace(base, staged_verdict="log")))
    assert (by_default.staged_verdict, by_default.staged_rule_id) == ("log", None)
    by_rule = decode(encode(replace(base, staged_verdict="deny", staged_rule_id=7)))
    assert (by_rule.staged_verdict, by_rule.staged_rule_id) == ("deny", 7)
    odd = bytearray(encode(replace(base, staged_verdict="deny", staged_rule_id=7)))
    odd[EVENT.offset("staged_verdict")] = 77
    assert (decode(bytes(odd)).staged_verdict, decode(bytes(odd)).staged_rule_id) == (
        "unknown",
        7,
    )


def test_decode_rejects_what_is_no_event() -> None:
    good = encode(
        decode(
            encode(
                FlowEvent(
                    1,
                    1,
                    60,
                    1,
                    None,
                    1,
                    4,
                    6,
                    "ingress",
                    "deny",
                    "10.0.0.1",
                    "10.0.0.2",
                    1,
                    2,
                    2,
                    "new",
                )
            )
        )
    )
    with pytest.raises(DecodeError, match=f"{EVENT.size - 1} bytes, expected {EVENT.size}"):
        decode(good[:-1])
    with pytest.raises(DecodeError, match=f"{EVENT.size + 1} bytes"):
        decode(good + b"\0")
    bad_family = bytearray(good)
    bad_family[EVENT.offset("family")] = 5
    with pytest.raises(DecodeError, match="address family 5"):
        decode(bytes(bad_family))
    unknown = bytearray(good)
    unknown[EVENT.offset("verdict")] = 9
    unknown[EVENT.offset("kind")] = 9
    assert (decode(bytes(unknown)).verdict, decode(bytes(unknown)).kind) == ("unknown", "unknown")


def test_decode_batch_keeps_good_records_in_order_and_counts_the_rest() -> None:
    evs = [
        FlowEvent(
            i, 1, 60, 1, None, 1, 4, 6, "ingress", "deny", "10.0.0.1", "10.0.0.2", i, 2, 2, "new"
        )
        for i in range(1, 6)
    ]
    raws = [encode(e) for e in evs]
    bad_family = bytearray(raws[2])
    bad_family[EVENT.offset("family")] = 5
    rows, bad = decode_batch(
        [raws[0], raws[1][:-1], bytes(bad_family), raws[3] + b"\0", raws[4], raws[1] + raws[3]]
    )
    assert bad == 4
    assert [r[0] for r in rows] == [1, 5]
    assert decode_batch([]) == ([], 0)


def test_render_writes_byte_for_byte_what_enrich_describes() -> None:
    """The hot path (`render`, a template per event) and the reference (`enrich` + orjson)
    agree on every field, for every kind of value: known and unknown names, rules of live,
    unknown and no generations, both families, odd host and interface names."""
    import random

    rnd = random.Random(7)
    policy = parse_policy_document(
        {
            "policies": [
                tcp_rule(3, name='say "hi"\u00e9', priority=5),
                tcp_rule(9, action="log", name="x"),
                tcp_rule(12, action="deny", name="would", mode="staged", src_group="g"),
            ],
            "groups": {"g": {"members": ["10.0.0.0/8"]}},
        }
    )
    fast = Enricher({1: "eth0", 7: 'we"ird\\if'}, host="host-ü\n")
    ref = Enricher({1: "eth0", 7: 'we"ird\\if'}, host="host-ü\n")
    for en in (fast, ref):
        en.add_generation(4, policy)
    addrs = {
        4: ["10.0.0.1", "192.168.255.254", "0.0.0.0"],
        6: ["2001:db8::1", "::ffff:1.2.3.4", "fe80::abcd:1"],
    }
    evs = []
    for _ in range(400):
        family = rnd.choice((4, 6))
        evs.append(
            FlowEvent(
                ts_ns=time.monotonic_ns() + rnd.randrange(-3 * 10**9, 3 * 10**9),
                packets=rnd.randrange(1, 2**40),
                bytes=rnd.randrange(0, 2**50),
                ifindex=rnd.choice((1, 7, 99)),
                rule_id=rnd.choice((None, 3, 9, 77)),
                generation=rnd.choice((4, 4, 5)),
                family=family,
                protocol=rnd.choice((1, 6, 17, 58, 47)),
                direction=rnd.choice(("ingress", "egress")),
                verdict=rnd.choice(("deny", "log")),
                src_ip=rnd.choice(addrs[family]),
                dst_ip=rnd.choice(addrs[family]),
                src_port=rnd.randrange(65536),
                dst_port=rnd.randrange(65536),
                tcp_flags=rnd.randrange(256),
                kind=rnd.choice(("new", "update")),
                staged_verdict=rnd.choice((None, None, "deny", "log", "allow")),
                staged_rule_id=rnd.choice((None, 12, 3, 77)),
            )
        )
    raws = [encode(e) for e in evs]
    odd = bytearray(raws[0])
    odd[EVENT.offset("direction")] = 9
    odd[EVENT.offset("verdict")] = 200
    odd[EVENT.offset("kind")] = 0
    odd[EVENT.offset("staged_verdict")] = 201
    raws.append(bytes(odd))
    rows, bad = decode_batch(raws)
    assert bad == 0
    items = fast.render(rows)
    ref._clock_offset_ns, ref._clock_read_at = fast._clock_offset_ns, fast._clock_read_at
    assert len(items) == len(raws)
    for item, raw in zip(items, raws, strict=True):
        obj = ref.enrich(decode(raw))
        assert item.data == orjson.dumps(obj), (item.data, obj)
        assert item.key == flow_key(obj) and item.seq == obj["seq"] and item.weight == 1
        assert not item.is_lost and item.obj == obj
        valid(obj)
    assert fast.seq == ref.seq == len(raws)
    staged = [i.obj["staged"] for i in items if "staged" in i.obj]
    assert any(st["rule"] and st["rule"].get("mode") == "staged" for st in staged)
    assert any(st["rule"] is None for st in staged)
    assert {st["verdict"] for st in staged} == {"deny", "log", "allow", "unknown"}
