"""Seeded rule sets and the packets that exercise them.

Rule sets are drawn from a palette of common rule templates (service access, subnet to
subnet, host to host, exposed services, quarantined networks, a port range, ICMP, and their
IPv6 counterparts). Each template has fixed prefix lengths and port forms, so the set of
shapes (mask combinations) is the same for 10 and for 100,000 rules: what grows is the number
of entries per shape. `shape_sweep_policy` instead spreads rules evenly over k shapes.
`irregular_policy` is the opposite of the palette: every field drawn at random, the set a new
user writes, with hundreds of shapes; `group_members` draws the members of an address group.
No rule and no member of these sets covers the lab's addresses (198.18.0.0/15,
fd6d:7365:67::/48): lab traffic is decided only by the rules a benchmark adds.

Packets for a measured case are picked with `probe`, a Python mirror of the classifier's
tuple-space search over the compiled tables, so every packet of a case takes the same path
(same winning rule, same number of probes) while being a distinct flow.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

from bench.frames import TCP, UDP, Flow
from streamer.datapath.compiler import CompiledPolicy, Entry, EntryKey, entry_of
from streamer.datapath.layout import MS_DIR_EGRESS, MS_DIR_INGRESS

# Top rules: one per family, above every generated priority, so "the highest-priority rule"
# is a fixed, allowed rule (the cost of judging a flow, not of emitting an event).
TOP_PRIORITY = 65535
TOP4_ID = 1
TOP6_ID = 2
# Late rules: one per family, below every generated priority, in a shape of their own, so it
# is always the last shape probed. They match broad traffic (a /8 to anywhere), so their
# packets vary in every field, as the default action's do.
BOTTOM_PRIORITY = 0
BOTTOM4_ID = 3
BOTTOM6_ID = 4
BOTTOM_PORT = 8443
_PRIORITIES = (100, 100, 100, 100, 100, 50, 200, 300, 500, 1000)
_ACTIONS = ("allow",) * 7 + ("deny",) * 2 + ("log",)
_PORTS = (22, 53, 80, 443, 2379, 3306, 5432, 6379, 8080, 9090, 9100, 27017)
_V4_NET = 0x0A000000  # 10.0.0.0/8: every generated IPv4 rule address
_V6_NET = 0xFD00 << 112  # fd00::/8: every generated IPv6 rule address
# Benchmarking ranges (RFC 2544, RFC 5180): no generated rule covers them.
_V4_BENCH_SRC = 0xC6120000  # 198.18.0.0/16
_V4_BENCH_DST = 0xC6130000  # 198.19.0.0/16
_V6_BENCH = 0x20010002 << 96  # 2001:2::/48

Doc = dict[str, Any]


def _mask(bits: int, plen: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def _v4(rng: random.Random, plen: int) -> str:
    addr = (_V4_NET | rng.getrandbits(24)) & _mask(32, plen)
    text = socket.inet_ntoa(struct.pack("!I", addr))
    return text if plen == 32 else f"{text}/{plen}"


def _v6(rng: random.Random, plen: int) -> str:
    addr = (_V6_NET | rng.getrandbits(120)) & _mask(128, plen)
    text = str(IPv6Address(addr))
    return text if plen == 128 else f"{text}/{plen}"


def _common(rng: random.Random) -> Doc:
    return {"priority": rng.choice(_PRIORITIES), "action": rng.choice(_ACTIONS)}


# Each template: (name, weight, rule fields). Prefix lengths and port forms are fixed per
# template; addresses, ports, priorities and actions vary.
def _svc(rng: random.Random) -> Doc:
    return {
        "src_ip": _v4(rng, 24),
        "dst_ip": _v4(rng, 32),
        "protocol": "tcp",
        "dst_port": rng.choice(_PORTS),
        "direction": "ingress",
        **_common(rng),
    }


def _subnet(rng: random.Random) -> Doc:
    return {
        "src_ip": _v4(rng, 16),
        "dst_ip": _v4(rng, 24),
        "protocol": rng.choice(("tcp", "udp")),
        "dst_port": rng.choice(_PORTS),
        "direction": "any",
        **_common(rng),
    }


def _hosts(rng: random.Random) -> Doc:
    return {
        "src_ip": _v4(rng, 32),
        "dst_ip": _v4(rng, 32),
        "protocol": "tcp",
        "dst_port": rng.choice(_PORTS),
        "direction": "egress",
        **_common(rng),
    }


def _quarantine(rng: random.Random) -> Doc:
    return {
        "src_ip": _v4(rng, 28),
        "protocol": "any",
        "action": "deny",
        "priority": rng.choice(_PRIORITIES),
    }


def _port_range(rng: random.Random) -> Doc:
    # 8000-8099 splits into three prefix blocks (/10, /11, /14): three shapes.
    return {
        "src_ip": _v4(rng, 24),
        "dst_ip": _v4(rng, 28),
        "protocol": "tcp",
        "dst_port": "8000-8099",
        "direction": "ingress",
        **_common(rng),
    }


def _icmp(rng: random.Random) -> Doc:
    return {"src_ip": _v4(rng, 24), "dst_ip": _v4(rng, 32), "protocol": "icmp", **_common(rng)}


def _svc6(rng: random.Random) -> Doc:
    return {
        "src_ip": _v6(rng, 64),
        "dst_ip": _v6(rng, 128),
        "protocol": "tcp",
        "dst_port": rng.choice(_PORTS),
        "direction": "ingress",
        **_common(rng),
    }


def _quarantine6(rng: random.Random) -> Doc:
    return {
        "src_ip": _v6(rng, 48),
        "protocol": "any",
        "action": "deny",
        "priority": rng.choice(_PRIORITIES),
    }


def _bottom4(rng: random.Random) -> Doc:
    return {
        "src_ip": "10.0.0.0/8",
        "protocol": "tcp",
        "dst_port": BOTTOM_PORT,
        "direction": "ingress",
        "priority": BOTTOM_PRIORITY,
        "action": "allow",
    }


def _bottom6(rng: random.Random) -> Doc:
    return {
        "src_ip": "fd00::/8",
        "protocol": "tcp",
        "dst_port": BOTTOM_PORT,
        "direction": "ingress",
        "priority": BOTTOM_PRIORITY,
        "action": "allow",
    }


Template = tuple[str, int, Callable[[random.Random], Doc]]
PALETTE: tuple[Template, ...] = (
    ("svc", 35, _svc),
    ("subnet", 12, _subnet),
    ("hosts", 15, _hosts),
    ("quarantine", 3, _quarantine),
    ("port-range", 7, _port_range),
    ("icmp", 5, _icmp),
    ("svc6", 20, _svc6),
    ("quarantine6", 3, _quarantine6),
)
# Besides the palette, every palette set holds four fixed rules: a top and a bottom rule
# per family (TOP*_ID, BOTTOM*_ID).
FIXED_RULES = 4


def palette_policy(count: int, seed: int) -> Doc:
    """A policy document of `count` rules (at least 4): the fixed rules, then the palette.

    The first 10 rules hold every template once, so even 10 rules have the palette's shapes.
    Default action: deny (a microsegmented host).
    """
    if count < FIXED_RULES:
        raise ValueError(f"a palette set has at least {FIXED_RULES} rules, not {count}")
    rng = random.Random(seed)
    rules: list[Doc] = [
        {
            **_svc(rng),
            "rule_id": TOP4_ID,
            "name": "top4",
            "priority": TOP_PRIORITY,
            "action": "allow",
        },
        {
            **_svc6(rng),
            "rule_id": TOP6_ID,
            "name": "top6",
            "priority": TOP_PRIORITY,
            "action": "allow",
        },
        {**_bottom4(rng), "rule_id": BOTTOM4_ID, "name": "bottom4"},
        {**_bottom6(rng), "rule_id": BOTTOM6_ID, "name": "bottom6"},
    ]
    fns = [fn for _, _, fn in PALETTE]
    weights = [w for _, w, _ in PALETTE]
    # The top rules already stand for svc and svc6: the others come first.
    first = [fn for fn in fns if fn not in (_svc, _svc6)]
    for i in range(count - len(rules)):
        fn = first[i] if i < len(first) else rng.choices(fns, weights)[0]
        rules.append({**fn(rng), "rule_id": len(rules) + 1})
    return {"default_action": "deny", "policies": rules}


def sweep_shapes(k: int) -> list[tuple[int, int]]:
    """k distinct (src prefix length, dst prefix length) pairs, spread over a 16x16 grid."""
    grid = [(s, d) for s in range(16, 32) for d in range(17, 33)]
    if not 1 <= k <= len(grid):
        raise ValueError(f"shape count must be 1..{len(grid)}, not {k}")
    return [grid[i * len(grid) // k] for i in range(k)]


def shape_sweep_policy(count: int, k: int, seed: int) -> Doc:
    """`count` IPv4 TCP rules spread evenly over exactly k shapes, plus the IPv4 top rule."""
    rng = random.Random(seed)
    pairs = sweep_shapes(k)
    rules: list[Doc] = []
    for i in range(count):
        splen, dplen = pairs[i % k]
        rule: Doc = {
            "rule_id": i + 1,
            "src_ip": _v4(rng, splen),
            "dst_ip": _v4(rng, dplen),
            "protocol": "tcp",
            "dst_port": rng.choice(_PORTS),
            "direction": "ingress",
            **_common(rng),
        }
        if i == 0:
            rule.update(name="top4", priority=TOP_PRIORITY, action="allow")
        rules.append(rule)
    return {"default_action": "deny", "policies": rules}


# ---- the irregular set ----------------------------------------------------------------------

IRREGULAR_PORTS = (
    22, 25, 53, 80, 110, 123, 143, 389, 443, 445, 465, 587, 636, 993, 995, 1433, 1521, 2049,
    2379, 3000, 3306, 3389, 5000, 5432, 5672, 6379, 6443, 8080, 8443, 9000, 9090, 9092, 9200,
    11211, 27017,
)  # fmt: skip
_COMMON_RANGES = ("1024-65535", "8000-8999", "30000-32767", "6000-6063", "49152-65535")
_LAB4_NET16 = 0xC612  # 198.18.0.0/15 (every lab and benchmarking address): never drawn


def _any_v4(rng: random.Random, plen: int) -> str:
    """A unicast IPv4 network of `plen` anywhere but 0/8, 127/8 and the lab's 198.18.0.0/15."""
    while True:
        addr = rng.getrandbits(32) & _mask(32, plen)
        first = addr >> 24
        if 1 <= first <= 223 and first != 127 and addr >> 17 != _LAB4_NET16 >> 1:
            text = socket.inet_ntoa(struct.pack("!I", addr))
            return text if plen == 32 else f"{text}/{plen}"


def _any_v6(rng: random.Random, plen: int) -> str:
    """An IPv6 network of `plen` in 2000::/4 (global unicast: never the lab's fd6d::)."""
    addr = ((0x2000 | rng.getrandbits(12)) << 112 | rng.getrandbits(112)) & _mask(128, plen)
    text = str(IPv6Address(addr))
    return text if plen == 128 else f"{text}/{plen}"


def _irregular_port(rng: random.Random) -> int | str:
    """0 (any) 30 %, one port 45 % (a well-known one or any), a range 25 %: a common one or
    an arbitrary span, which splits into many prefix blocks (shapes)."""
    r = rng.random()
    if r < 0.30:
        return 0
    if r < 0.75:
        return rng.choice(IRREGULAR_PORTS) if rng.random() < 0.6 else rng.randrange(1, 65536)
    if r < 0.80:
        return rng.choice(_COMMON_RANGES)
    lo = rng.randrange(1, 65000)
    span = rng.choice((1, 9, 15, 99, 255, 1000, rng.randrange(1, 2000)))
    return f"{lo}-{min(65535, lo + span)}"


def _irregular_rule(rng: random.Random, rule_id: int) -> Doc:
    v6 = rng.random() < 0.15
    protocol = rng.choices(("tcp", "udp", "icmp", "any"), (50, 25, 8, 17))[0]
    if v6:
        src = _any_v6(rng, rng.choice((48, 64, 128)))
        dst = rng.choice(("any", _any_v6(rng, 128), _any_v6(rng, 64)))
        protocol = "icmpv6" if protocol == "icmp" else protocol
    else:
        src = _any_v4(rng, rng.choice((24, 28, 32)))
        dst = rng.choice(("any", _any_v4(rng, 32), _any_v4(rng, 24)))
    rule: Doc = {
        "rule_id": rule_id,
        "src_ip": src,
        "dst_ip": dst,
        "protocol": protocol,
        "action": rng.choices(("allow", "deny", "log"), (6, 3, 1))[0],
        "priority": rng.randint(1, 999),
        "direction": rng.choice(("ingress", "egress", "any")),
    }
    if protocol in ("tcp", "udp", "any"):
        port = _irregular_port(rng)
        if port:
            rule["dst_port"] = port
        if rng.random() < 0.05:
            rule["src_port"] = rng.choice(IRREGULAR_PORTS)
    return rule


def irregular_policy(count: int, seed: int) -> Doc:
    """A policy document of `count` rules (rule_ids 1..count), every field drawn at random:
    IPv4 sources /24, /28, /32 (15 % IPv6 /48, /64, /128), destinations any, /32 or /24
    (IPv6: any, /128, /64), protocols tcp, udp, icmp, any, ports as `_irregular_port`, a few
    source ports, actions allow / deny / log, priorities 1-999, any direction. Default deny.
    """
    rng = random.Random(seed)
    return {
        "default_action": "deny",
        "policies": [_irregular_rule(rng, i + 1) for i in range(count)],
    }


RULE_SETS: dict[str, Callable[[int, int], Doc]] = {
    "palette": palette_policy,
    "irregular": irregular_policy,
}


def group_members(count: int, seed: int) -> list[str]:
    """`count` distinct members of an address group: IPv4 hosts (70 %), IPv4 /24../28
    (15 %), IPv6 hosts (10 %) and /64s (5 %); none covers a lab address."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        r = rng.random()
        if r < 0.70:
            member = _any_v4(rng, 32)
        elif r < 0.85:
            member = _any_v4(rng, rng.choice((24, 26, 28)))
        elif r < 0.95:
            member = _any_v6(rng, 128)
        else:
            member = _any_v6(rng, 64)
        out[member] = None
    return list(out)


# ---- the tuple-space search, mirrored ------------------------------------------------------


def probe(compiled: CompiledPolicy, flow: Flow) -> tuple[Entry | None, int]:
    """(winning entry or None, shapes probed) for `flow`, as bpf/classifier.c judges it."""
    tables = compiled.family(flow.family)
    bits = 32 if flow.family == 4 else 128
    direction = MS_DIR_INGRESS if flow.direction == "ingress" else MS_DIR_EGRESS
    best: Entry | None = None
    score = 0
    probes = 0
    # the keys' values, not `tables.entries` (which builds every Entry on each call)
    for shape, max_score, values in zip(
        tables.shapes, tables.max_scores, tables.scores, strict=True
    ):
        if score >= max_score:
            break
        probes += 1
        key = (
            direction,
            0 if shape.proto_wild else flow.proto,
            flow.sport & _mask(16, shape.sport_plen),
            flow.dport & _mask(16, shape.dport_plen),
            flow.src & _mask(bits, shape.src_plen),
            flow.dst & _mask(bits, shape.dst_plen),
        )
        value = values.get(key)
        entry = entry_of(value) if value else None
        if entry is not None and entry.score > score:
            best, score = entry, entry.score
    return best, probes


@dataclass(frozen=True)
class Target:
    """What every packet of a case does: its winning rule (0: default action), its probes."""

    family: int
    rule_id: int
    action: int | None  # compiler action code of the rule; None: the default action
    probes: int
    shape_index: int | None  # where the rule's shape is in probe order


def _random_flow(
    rng: random.Random,
    family: int,
    shape_index: int | None,
    compiled: CompiledPolicy,
    key: EntryKey | None,
    one_pair: bool = False,
) -> Flow:
    """A flow inside `key` of shape `shape_index` (free bits random), or from the bench ranges
    (with `one_pair`: always the same addresses and destination port, only sport varies)."""
    bits = 32 if family == 4 else 128
    sport = rng.randrange(1024, 65536)
    if one_pair and key is None:
        if family == 4:
            return Flow(4, _V4_BENCH_SRC | 1, _V4_BENCH_DST | 1, TCP, sport, 443, "ingress")
        return Flow(6, _V6_BENCH | 1, _V6_BENCH | (1 << 79) | 1, TCP, sport, 443, "ingress")
    if key is None or shape_index is None:
        if family == 4:
            src = _V4_BENCH_SRC | rng.getrandbits(16)
            dst = _V4_BENCH_DST | rng.getrandbits(16)
        else:
            src = _V6_BENCH | rng.getrandbits(80)
            dst = _V6_BENCH | (1 << 79) | rng.getrandbits(79)
        proto = rng.choice((TCP, TCP, TCP, UDP))
        return Flow(family, src, dst, proto, sport, rng.choice(_PORTS), "ingress")
    shape = compiled.family(family).shapes[shape_index]
    direction, proto, kspt, kdpt, ksrc, kdst = key
    src = ksrc | (rng.getrandbits(bits) & ~_mask(bits, shape.src_plen) & ((1 << bits) - 1))
    dst = kdst | (rng.getrandbits(bits) & ~_mask(bits, shape.dst_plen) & ((1 << bits) - 1))
    dport = kdpt | (rng.getrandbits(16) & ~_mask(16, shape.dport_plen) & 0xFFFF)
    if shape.sport_plen:
        sport = kspt | (rng.getrandbits(16) & ~_mask(16, shape.sport_plen) & 0xFFFF)
    return Flow(
        family,
        src,
        dst,
        proto or TCP,
        sport,
        dport,
        "ingress" if direction == MS_DIR_INGRESS else "egress",
    )


def flows_for(
    compiled: CompiledPolicy,
    target: Target,
    key: EntryKey | None,
    count: int,
    seed: int,
    one_pair: bool = False,
) -> list[Flow]:
    """Up to `count` distinct flows that all take `target`'s path (bounded attempts).

    `one_pair` (default-action targets only): one address pair, so every packet probes the
    same rule-table buckets (cache-warm) and only the session key differs.
    """
    rng = random.Random(seed)
    out: dict[tuple[int, ...], Flow] = {}
    for _ in range(count * 20):
        flow = _random_flow(rng, target.family, target.shape_index, compiled, key, one_pair)
        entry, probes = probe(compiled, flow)
        rule_id = entry.rule_id if entry is not None else 0
        if rule_id == target.rule_id and probes == target.probes:
            out.setdefault((flow.src, flow.dst, flow.proto, flow.sport, flow.dport), flow)
            if len(out) >= count:
                break
    return list(out.values())


def rule_target(compiled: CompiledPolicy, family: int, rule_id: int) -> tuple[Target, EntryKey]:
    """The path of packets decided by `rule_id` (one of its entries; TCP preferred)."""
    tables = compiled.family(family)
    found: tuple[int, EntryKey, Entry] | None = None
    for i, entries in enumerate(tables.entries):
        for key, entry in entries.items():
            if entry.rule_id == rule_id and (found is None or key[1] == TCP):
                found = (i, key, entry)
    if found is None:
        raise ValueError(f"rule {rule_id} is not in the IPv{family} tables")
    i, key, entry = found
    flow = _random_flow(random.Random(0), family, i, compiled, key)
    _, probes = probe(compiled, flow)
    return Target(family, rule_id, entry.action, probes, i), key


def default_target(compiled: CompiledPolicy, family: int) -> Target:
    """The path of a flow no rule matches: every shape probed."""
    flow = _random_flow(random.Random(0), family, None, compiled, None)
    _, probes = probe(compiled, flow)
    return Target(family, 0, None, probes, None)
