"""Seeded rule sets and the packets that exercise them.

Rule sets are drawn from a palette of common rule templates (service access, subnet to
subnet, host to host, exposed services, quarantined networks, a port range, ICMP, and their
IPv6 counterparts). Each template has fixed prefix lengths and port forms, so the set of
shapes (mask combinations) is the same for 10 and for 100,000 rules: what grows is the number
of entries per shape. `shape_sweep_policy` instead spreads rules evenly over k shapes.

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
from streamer.compiler import DIR_EGRESS, DIR_INGRESS, CompiledPolicy, Entry

# Top rules: one per family, above every generated priority, so "the highest-priority rule"
# is a fixed, allowed rule (the cost of judging a flow, not of emitting an event).
TOP_PRIORITY = 65535
TOP4_ID = 1
TOP6_ID = 2
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
    return {"src_ip": _v4(rng, 24), "dst_ip": _v4(rng, 32), "protocol": "tcp",
            "dst_port": rng.choice(_PORTS), "direction": "ingress", **_common(rng)}


def _subnet(rng: random.Random) -> Doc:
    return {"src_ip": _v4(rng, 16), "dst_ip": _v4(rng, 24), "protocol": rng.choice(("tcp", "udp")),
            "dst_port": rng.choice(_PORTS), "direction": "any", **_common(rng)}


def _hosts(rng: random.Random) -> Doc:
    return {"src_ip": _v4(rng, 32), "dst_ip": _v4(rng, 32), "protocol": "tcp",
            "dst_port": rng.choice(_PORTS), "direction": "egress", **_common(rng)}


def _exposed(rng: random.Random) -> Doc:
    return {"dst_ip": _v4(rng, 32), "protocol": "tcp", "dst_port": rng.choice((80, 443)),
            "direction": "ingress", **_common(rng)}


def _quarantine(rng: random.Random) -> Doc:
    return {"src_ip": _v4(rng, 20), "protocol": "any", "action": "deny",
            "priority": rng.choice(_PRIORITIES)}


def _port_range(rng: random.Random) -> Doc:
    # 8000-8099 splits into three prefix blocks (/10, /11, /14): three shapes.
    return {"src_ip": _v4(rng, 24), "dst_ip": _v4(rng, 28), "protocol": "tcp",
            "dst_port": "8000-8099", "direction": "ingress", **_common(rng)}


def _icmp(rng: random.Random) -> Doc:
    return {"src_ip": _v4(rng, 24), "dst_ip": _v4(rng, 32), "protocol": "icmp", **_common(rng)}


def _svc6(rng: random.Random) -> Doc:
    return {"src_ip": _v6(rng, 64), "dst_ip": _v6(rng, 128), "protocol": "tcp",
            "dst_port": rng.choice(_PORTS), "direction": "ingress", **_common(rng)}


def _quarantine6(rng: random.Random) -> Doc:
    return {"src_ip": _v6(rng, 48), "protocol": "any", "action": "deny",
            "priority": rng.choice(_PRIORITIES)}


def _exposed6(rng: random.Random) -> Doc:
    return {"dst_ip": _v6(rng, 128), "protocol": "tcp", "dst_port": rng.choice((80, 443)),
            "direction": "ingress", **_common(rng)}


Template = tuple[str, int, Callable[[random.Random], Doc]]
PALETTE: tuple[Template, ...] = (
    ("svc", 30, _svc),
    ("subnet", 10, _subnet),
    ("hosts", 15, _hosts),
    ("exposed", 5, _exposed),
    ("quarantine", 3, _quarantine),
    ("port-range", 7, _port_range),
    ("icmp", 5, _icmp),
    ("svc6", 15, _svc6),
    ("quarantine6", 2, _quarantine6),
    ("exposed6", 8, _exposed6),
)


def palette_policy(count: int, seed: int) -> Doc:
    """A policy document of `count` rules (at least 2): the two top rules, then templates.

    The first 10 rules take every template once, so even 10 rules have the palette's shapes.
    Default action: deny (a microsegmented host).
    """
    rng = random.Random(seed)
    rules: list[Doc] = [
        {**_svc(rng), "rule_id": TOP4_ID, "name": "top4", "priority": TOP_PRIORITY,
         "action": "allow"},
        {**_svc6(rng), "rule_id": TOP6_ID, "name": "top6", "priority": TOP_PRIORITY,
         "action": "allow"},
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
        rule: Doc = {"rule_id": i + 1, "src_ip": _v4(rng, splen), "dst_ip": _v4(rng, dplen),
                     "protocol": "tcp", "dst_port": rng.choice(_PORTS), "direction": "ingress",
                     **_common(rng)}
        if i == 0:
            rule.update(name="top4", priority=TOP_PRIORITY, action="allow")
        rules.append(rule)
    return {"default_action": "deny", "policies": rules}


# ---- the tuple-space search, mirrored ------------------------------------------------------


def probe(compiled: CompiledPolicy, flow: Flow) -> tuple[Entry | None, int]:
    """(winning entry or None, shapes probed) for `flow`, as bpf/classifier.c judges it."""
    tables = compiled.family(flow.family)
    bits = 32 if flow.family == 4 else 128
    direction = DIR_INGRESS if flow.direction == "ingress" else DIR_EGRESS
    best: Entry | None = None
    score = 0
    probes = 0
    for shape, max_score, entries in zip(
        tables.shapes, tables.max_scores, tables.entries, strict=True
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
        entry = entries.get(key)
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


def _random_flow(rng: random.Random, family: int, shape_index: int | None,
                 compiled: CompiledPolicy, key: tuple[int, int, int, int, int, int] | None
                 ) -> Flow:
    """A flow inside `key` of shape `shape_index` (free bits random), or from the bench ranges."""
    bits = 32 if family == 4 else 128
    sport = rng.randrange(1024, 65536)
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
    return Flow(family, src, dst, proto or TCP, sport, dport,
                "ingress" if direction == DIR_INGRESS else "egress")


def flows_for(compiled: CompiledPolicy, target: Target, key: tuple[int, ...] | None,
              count: int, seed: int) -> list[Flow]:
    """Up to `count` distinct flows that all take `target`'s path (bounded attempts)."""
    rng = random.Random(seed)
    out: dict[tuple[int, ...], Flow] = {}
    ekey = None if key is None else (key[0], key[1], key[2], key[3], key[4], key[5])
    for _ in range(count * 20):
        flow = _random_flow(rng, target.family, target.shape_index, compiled, ekey)
        entry, probes = probe(compiled, flow)
        rule_id = entry.rule_id if entry is not None else 0
        if rule_id == target.rule_id and probes == target.probes:
            out.setdefault((flow.src, flow.dst, flow.proto, flow.sport, flow.dport), flow)
            if len(out) >= count:
                break
    return list(out.values())


def top_target(compiled: CompiledPolicy, family: int, rule_id: int) -> tuple[Target, tuple[int, ...]]:
    """The path of the family's top rule (it sits in the first shape probed)."""
    tables = compiled.family(family)
    for i, entries in enumerate(tables.entries):
        for key, entry in entries.items():
            if entry.rule_id == rule_id:
                flow = _random_flow(random.Random(0), family, i, compiled, key)
                _, probes = probe(compiled, flow)
                return Target(family, rule_id, entry.action, probes, i), key
    raise ValueError(f"rule {rule_id} is not in the IPv{family} tables")


def late_target(compiled: CompiledPolicy, family: int, seed: int
                ) -> tuple[Target, tuple[int, ...]]:
    """A rule as late in probe order as possible that wins its packets; allow rules preferred.

    Walks shapes from the last probed backwards, sampling entries of TCP/UDP (or wildcard)
    keys, and keeps the first whose packets it really decides (nothing earlier matches).
    """
    rng = random.Random(seed)
    tables = compiled.family(family)
    fallback: tuple[Target, tuple[int, ...]] | None = None
    for i in range(len(tables.shapes) - 1, -1, -1):
        items = list(tables.entries[i].items())
        rng.shuffle(items)
        for key, entry in items[:400]:
            if key[1] not in (0, TCP, UDP):
                continue
            flow = _random_flow(rng, family, i, compiled, key)
            won, probes = probe(compiled, flow)
            if won is None or won.rule_id != entry.rule_id:
                continue
            found = (Target(family, entry.rule_id, entry.action, probes, i), key)
            if entry.action == 0:
                return found
            fallback = fallback or found
        if fallback is not None:
            return fallback
    raise ValueError(f"no IPv{family} rule decides packets of its own")


def default_target(compiled: CompiledPolicy, family: int) -> Target:
    """The path of a flow no rule matches: every shape probed."""
    flow = _random_flow(random.Random(0), family, None, compiled, None)
    _, probes = probe(compiled, flow)
    return Target(family, 0, None, probes, None)
