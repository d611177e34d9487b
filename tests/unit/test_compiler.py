"""The policy compiler (streamer/datapath/compiler.py), pure logic: port blocks, entries,
shapes, order."""

from __future__ import annotations

import ipaddress
import itertools
import random
from typing import Any

import pytest
from support.tables import probe

from streamer.datapath.compiler import (
    ACTION_CODES,
    CompiledPolicy,
    Shape,
    bloom_layout,
    build_bloom,
    compile_policy,
    key_hash,
    pack_rule_key,
    pack_rule_val,
    pack_shape,
    port_blocks,
)
from streamer.datapath.layout import MS_BLOOM_BANK_WORDS, MS_DIR_EGRESS, MS_DIR_INGRESS
from streamer.datapath.reference import Packet, judge
from streamer.policy.model import PolicySet, parse_policy_document
from streamer.vocabulary import Action

MAX_SHAPES = 1024


def _policy(*rules: dict[str, Any], default: str = "deny") -> PolicySet:
    full = [{"protocol": "any", "action": "allow", **r} for r in rules]
    return parse_policy_document({"default_action": default, "policies": full})


def _compile(*rules: dict[str, Any], default: str = "deny") -> CompiledPolicy:
    return compile_policy(_policy(*rules, default=default), MAX_SHAPES)


# ---- port_blocks ---------------------------------------------------------------------------


def _check_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    blocks = port_blocks((lo, hi))
    covered: list[tuple[int, int]] = []
    for value, plen in blocks:
        assert 0 <= plen <= 16, (lo, hi, blocks)
        size = 1 << (16 - plen)
        assert value % size == 0, f"block {value}/{plen} of {lo}-{hi} is not prefix-aligned"
        covered.append((value, value + size - 1))
    # Contiguous, in order, exactly lo..hi: no port lost, none added.
    assert covered[0][0] == lo and covered[-1][1] == hi, (lo, hi, blocks)
    for (_, end), (start, _) in itertools.pairwise(covered):
        assert start == end + 1, (lo, hi, blocks)
    # The greedy split is the minimal prefix cover: never more than 2*16 - 2 blocks.
    assert len(blocks) <= 30
    return blocks


def test_port_blocks_no_condition_is_one_wildcard_block() -> None:
    assert port_blocks(None) == [(0, 0)]


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 65535, [(0, 0)]),
        (0, 0, [(0, 16)]),
        (22, 22, [(22, 16)]),
        (65535, 65535, [(65535, 16)]),
        (1024, 65535, [(1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2), (32768, 1)]),
        (0, 1023, [(0, 6)]),
        (1000, 1003, [(1000, 14)]),
        (1, 65534, None),
        (32767, 32768, [(32767, 16), (32768, 16)]),
    ],
)
def test_port_blocks_known_ranges(lo: int, hi: int, expected: list[tuple[int, int]] | None) -> None:
    blocks = _check_blocks(lo, hi)
    if expected is not None:
        assert blocks == expected
    if (lo, hi) == (1, 65534):
        assert len(blocks) == 30  # the worst case


def test_port_blocks_random_ranges_are_exact() -> None:
    rng = random.Random(0x5EED)
    for _ in range(3000):
        a, b = rng.randrange(65536), rng.randrange(65536)
        if rng.random() < 0.3:
            b = min(65535, a + rng.randrange(40))  # short ranges: many small blocks at edges
        _check_blocks(min(a, b), max(a, b))


def test_port_blocks_membership_matches_range_on_edges() -> None:
    rng = random.Random(7)
    for _ in range(300):
        lo = rng.randrange(65536)
        hi = rng.randrange(lo, 65536)
        blocks = port_blocks((lo, hi))
        for port in {lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, rng.randrange(65536)}:
            if not 0 <= port <= 65535:
                continue
            hits = [v for v, plen in blocks if port >> (16 - plen) == v >> (16 - plen)]
            assert len(hits) == (1 if lo <= port <= hi else 0), (lo, hi, port, blocks)


# ---- entries and shapes --------------------------------------------------------------------


def test_ipv4_rule_both_directions() -> None:
    c = _compile({"rule_id": 1, "src_ip": "10.0.0.0/8", "dst_port": 22, "protocol": "tcp"})
    assert len(c.v4.shapes) == 1 and c.v6.shapes == []
    assert c.v4.shapes[0] == Shape(4, 8, 0, 0, 16, False)
    keys = set(c.v4.entries[0])
    assert keys == {
        (MS_DIR_INGRESS, 6, 0, 22, 0x0A000000, 0),
        (MS_DIR_EGRESS, 6, 0, 22, 0x0A000000, 0),
    }
    assert c.entry_count == 2 and c.shape_count == 1


def test_any_address_rule_goes_to_both_families() -> None:
    c = _compile({"rule_id": 1, "protocol": "any", "direction": "ingress"})
    assert c.v4.shapes == [Shape(4, 0, 0, 0, 0, True)]
    assert c.v6.shapes == [Shape(6, 0, 0, 0, 0, True)]
    assert list(c.v4.entries[0]) == [(MS_DIR_INGRESS, 0, 0, 0, 0, 0)]
    assert c.entry_count == 2


def test_family_specific_any_stays_in_its_family() -> None:
    c = _compile({"rule_id": 1, "dst_ip": "0.0.0.0/0"}, {"rule_id": 2, "src_ip": "::/0"})
    assert [e.rule_id for e in c.v4.entries[0].values()] == [1, 1]
    assert [e.rule_id for e in c.v6.entries[0].values()] == [2, 2]
    assert c.v4.shapes[0].dst_plen == 0 and c.v6.shapes[0].src_plen == 0


def test_any_protocol_with_ports_narrows_to_tcp_and_udp() -> None:
    c = _compile({"rule_id": 1, "dst_port": 80, "direction": "egress", "protocol": "any"})
    for ft in (c.v4, c.v6):
        assert len(ft.shapes) == 1 and not ft.shapes[0].proto_wild
        assert {k[1] for k in ft.entries[0]} == {6, 17}
    assert c.entry_count == 4


@pytest.mark.parametrize(("protocol", "family"), [("icmp", 4), ("icmpv6", 6)])
def test_icmp_rule_with_any_address_compiles_to_its_family_only(protocol: str, family: int) -> None:
    """icmp is ICMP for IPv4 and icmpv6 for IPv6 (contract §2; Rule.families): an IPv6 packet
    with next header 1 must not match an `icmp` rule, nor IPv4 protocol 58 an `icmpv6` one."""
    c = _compile({"rule_id": 1, "protocol": protocol})
    assert len(c.family(family).shapes) == 1
    assert c.family(10 - family).shapes == [], "entries in the other family would match it"


def test_port_range_splits_into_shapes_by_block_length() -> None:
    c = _compile(
        {
            "rule_id": 1,
            "dst_ip": "192.0.2.0/24",
            "dst_port": "1024-65535",
            "protocol": "udp",
            "direction": "ingress",
        }
    )
    assert sorted(s.dport_plen for s in c.v4.shapes) == [1, 2, 3, 4, 5, 6]
    assert c.v4.entry_count == 6 and c.v6.shapes == []


def test_src_and_dst_ranges_multiply() -> None:
    c = _compile(
        {
            "rule_id": 1,
            "src_port": "1000-1003",
            "dst_port": "10-13",
            "protocol": "tcp",
            "src_ip": "2001:db8::/97",
            "direction": "ingress",
        }
    )
    # 1000-1003 is one /14 block; 10-13 is 10-11 (/15) and 12-13 (/15): 2 entries, 1 shape.
    assert c.v6.shapes == [Shape(6, 97, 0, 14, 15, False)]
    assert c.v6.entry_count == 2


def test_rules_sharing_masks_share_a_shape() -> None:
    c = _compile(
        {"rule_id": 1, "src_ip": "10.0.0.0/8", "protocol": "tcp", "direction": "ingress"},
        {"rule_id": 2, "src_ip": "11.0.0.0/8", "protocol": "udp", "direction": "ingress"},
        {"rule_id": 3, "src_ip": "12.0.0.0/9", "protocol": "udp", "direction": "ingress"},
    )
    assert len(c.v4.shapes) == 2 and c.v4.entry_count == 3


def test_best_rule_per_key() -> None:
    same = {"src_ip": "10.0.0.0/8", "protocol": "tcp", "direction": "ingress"}
    cases: list[tuple[list[dict[str, Any]], int]] = [
        # higher priority wins whatever its action
        (
            [
                {"rule_id": 1, "action": "deny", "priority": 100},
                {"rule_id": 2, "action": "allow", "priority": 101},
            ],
            2,
        ),
        # tie: deny > log > allow
        ([{"rule_id": 1, "action": "allow"}, {"rule_id": 2, "action": "log"}], 2),
        ([{"rule_id": 3, "action": "log"}, {"rule_id": 4, "action": "deny"}], 4),
        ([{"rule_id": 5, "action": "deny"}, {"rule_id": 6, "action": "allow"}], 5),
        # then the lowest rule_id, whichever comes first in the list
        ([{"rule_id": 9, "action": "log"}, {"rule_id": 8, "action": "log"}], 8),
        ([{"rule_id": 4294967295, "action": "allow"}, {"rule_id": 1, "action": "allow"}], 1),
    ]
    for rules, winner in cases:
        pol = _policy(*({**same, **r} for r in rules))
        c = compile_policy(pol, MAX_SHAPES)
        assert len(c.v4.entries) == 1
        (entry,) = c.v4.entries[0].values()
        best = pol.get(winner)
        assert best is not None
        assert entry.rule_id == winner, rules
        assert entry.score == best.score + 1
        assert entry.action == ACTION_CODES[best.action]
        assert c.v4.max_scores == [entry.score]


def test_overlapping_keys_keep_each_rules_other_entries() -> None:
    # Rule 2 beats rule 1 on TCP only; rule 1 keeps UDP.
    c = _compile(
        {"rule_id": 1, "dst_port": 53, "protocol": "any", "direction": "ingress", "action": "log"},
        {"rule_id": 2, "dst_port": 53, "protocol": "tcp", "direction": "ingress", "action": "deny"},
    )
    for ft in (c.v4, c.v6):
        assert {k[1]: e.rule_id for k, e in ft.entries[0].items()} == {6: 2, 17: 1}


def test_shapes_sorted_by_max_score() -> None:
    rng = random.Random(11)
    rules = []
    for rid in range(1, 200):
        plen = rng.randrange(0, 33)
        net = (rng.getrandbits(32) >> (32 - plen) << (32 - plen)) if plen else 0
        addr = f"{(net >> 24) & 255}.{(net >> 16) & 255}.{(net >> 8) & 255}.{net & 255}/{plen}"
        rules.append(
            {
                "rule_id": rng.randrange(1, 2**32 - 1) // 200 * 200 + rid,
                "dst_ip": addr,
                "priority": rng.choice([0, 50, 100, 100, 65535]),
                "action": rng.choice(["allow", "deny", "log"]),
                "protocol": rng.choice(["tcp", "udp", "any", "icmp"]),
            }
        )
    pol = _policy(*rules)
    c = compile_policy(pol, MAX_SHAPES)
    ft = c.v4
    assert len(ft.shapes) == len(set(ft.shapes)) > 10
    assert ft.max_scores == sorted(ft.max_scores, reverse=True)
    for mx, entries in zip(ft.max_scores, ft.entries, strict=True):
        assert mx == max(e.score for e in entries.values())
    best = max(r.score for r in pol.policies if 4 in r.families)
    assert ft.max_scores[0] == best + 1


def test_more_shapes_than_allowed_are_merged_not_refused() -> None:
    rules = [{"rule_id": p + 1, "src_ip": f"10.0.0.0/{p}", "protocol": "tcp"} for p in range(8, 17)]
    pol = _policy(*rules)
    assert compile_policy(pol, 9).shape_count == 9
    assert len(compile_policy(pol, 8).v4.shapes) <= 8


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_merged_shapes_judge_like_the_reference(seed: int) -> None:
    """Far more shapes than the table holds, merged into 16 per family: same verdicts."""
    rng = random.Random(seed)
    rules = []
    for rid in range(1, 121):
        fam = rng.choice((4, 6))
        bits = 32 if fam == 4 else 128
        base = "10.0.0.0" if fam == 4 else "2001:db8::"

        def net(plen: int, base: str = base, bits: int = bits) -> str:
            host = ipaddress.ip_address(base)
            value = int(host) | (rng.getrandbits(bits) & ((1 << bits) - 1) >> 8)
            n = ipaddress.ip_network((value >> (bits - plen) << (bits - plen), plen))
            return str(n)

        lo = rng.randrange(0, 65000)
        rule: dict[str, object] = {
            "rule_id": rid,
            "src_ip": net(rng.randrange(bits - 14, bits - 6)),
            "dst_ip": net(rng.randrange(bits - 12, bits - 6)),
            "protocol": rng.choice(("tcp", "udp", "any")),
            "action": rng.choice(("allow", "deny", "log")),
            "priority": rng.choice((10, 100, 200)),
            "direction": rng.choice(("ingress", "egress", "any")),
        }
        if rng.random() < 0.5:
            rule["dst_port"] = f"{lo}-{lo + rng.randrange(0, 40)}"
        rules.append(rule)
    pol = _policy(*rules, default="deny")
    full = compile_policy(pol, 4096)
    assert full.shape_count > 40  # the point: far more shapes than the table below holds
    fitted = compile_policy(pol, 16)
    assert len(fitted.v4.shapes) <= 16 and len(fitted.v6.shapes) <= 16
    for _ in range(3000):
        r = rng.choice(pol.policies)
        fam = 4 if r.src_net is not None and r.src_net.version == 4 else 6
        src_net = r.src_net
        dst_net = r.dst_net
        assert src_net is not None and dst_net is not None

        def pick(n: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress._BaseAddress:
            if rng.random() < 0.8:
                return n.network_address + rng.randrange(n.num_addresses)
            return ipaddress.ip_address(int(n.network_address) ^ rng.getrandbits(20))

        pkt = Packet(
            family=fam,
            src=pick(src_net),  # type: ignore[arg-type]
            dst=pick(dst_net),  # type: ignore[arg-type]
            proto=rng.choice((6, 17)),
            sport=rng.randrange(65536),
            dport=rng.choice((rng.randrange(65536), *(r.dst_ports or (80,)))),
            direction=rng.choice(("ingress", "egress")),
        )
        want = judge(pol, pkt)
        got = probe(fitted, pkt)
        want_id = want.rule.rule_id if want.rule is not None else None
        assert (got.rule_id if got else None) == want_id, (seed, pkt)


def test_default_action_and_rule_ids() -> None:
    c = _compile({"rule_id": 5}, {"rule_id": 3}, default="allow")
    assert c.default_action == 0 and c.rule_ids == [5, 3]
    assert _compile(default="deny").default_action == 1
    assert _compile().shape_count == 0 and _compile().entry_count == 0


def test_packed_layouts() -> None:
    """Sizes of bpf/classifier.h structs (also checked against the compiled maps elsewhere)."""
    c = _compile(
        {
            "rule_id": 7,
            "src_ip": "2001:db8::/32",
            "dst_port": 443,
            "protocol": "tcp",
            "action": "deny",
            "direction": "ingress",
        }
    )
    key, entry = next(iter(c.v6.entries[0].items()))
    raw = pack_rule_key(6, 5, key)
    assert len(raw) == 40
    assert raw[:8] == bytes([5, 0, MS_DIR_INGRESS, 6, 0, 0, 0x01, 0xBB])
    assert raw[8:12] == bytes.fromhex("20010db8") and raw[24:] == bytes(16)
    assert len(pack_rule_key(4, 1, (1, 6, 0, 22, 0x0A000000, 0))) == 16
    val = pack_rule_val(entry, 3)
    # both views' halves (struct ms_rule_val): the same rule where no staged rule wins
    assert len(val) == 48 and val[16] == val[40] == ACTION_CODES[Action.DENY]
    assert val[:16] == val[24:40]
    shape = pack_shape(c.v6.shapes[0], c.v6.max_scores[0], 96, 10)
    assert len(shape) == 56  # struct ms_shape
    assert shape[:4] == b"\xff\xff\xff\xff" and shape[4:16] == bytes(12)
    assert shape[32:36] == b"\x00\x00\xff\xff" and shape[36] == 0xFF
    assert shape[37] == 64 - 10  # bloom_shift
    assert int.from_bytes(shape[40:48], "little") == c.v6.max_scores[0]
    assert int.from_bytes(shape[48:52], "little") == 96  # bloom_off
    assert pack_shape(c.v6.shapes[0], 1)[37] == 0  # no filter: always probed


def test_bloom_layout_and_filters() -> None:
    layout = bloom_layout([1, 4, 1000, 0])
    assert [b for _, b in layout] == [6, 6, 14, 6]  # >= 16 bits an entry, at least 64
    offs = [o for o, _ in layout]
    assert offs == [0, 1, 2, 2 + (1 << 14) // 64]
    huge = bloom_layout([10_000_000] * 3)
    assert sum((1 << b) // 64 for _, b in huge if b) <= MS_BLOOM_BANK_WORDS
    keys = [pack_rule_key(4, 0, (1, 6, 0, p, 0x0A000000, 0)) for p in range(100)]
    words = build_bloom(4, keys, 12)
    for k in keys:  # no false negatives, ever
        bit = key_hash(4, k) >> (64 - 12)
        assert words[bit >> 3] >> (bit & 7) & 1
