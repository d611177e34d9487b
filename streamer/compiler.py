"""Policy compiler: a validated PolicySet in, the classifier's tuple-space tables out.

Each rule is expanded into hash entries, one per (family, direction, protocol, source port
block, destination port block); entries that share their masks form a *shape*. The kernel
probes one hash lookup per shape, best shape first, so what costs per packet is the number of
distinct shapes, not the number of rules. Pure Python and kernel-free: the datapath packs the
result into maps, tests inspect it directly.

Dropped on the way: nothing that can match. A rule whose addresses are of different families
never matches any packet and produces no entry (the policy model rejects such rules anyway).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamer.policy import Action, PolicySet, Rule

DIR_INGRESS = 1
DIR_EGRESS = 2
PROTO_TCP = 6
PROTO_UDP = 17
ACTION_CODES = {Action.ALLOW: 0, Action.DENY: 1, Action.LOG: 2}
DEFAULT_ACTION_CODES = {"allow": 0, "deny": 1}

_DIRS = {"ingress": (DIR_INGRESS,), "egress": (DIR_EGRESS,), "any": (DIR_INGRESS, DIR_EGRESS)}


class CompileError(ValueError):
    """The policy cannot be expressed in the classifier's tables (too many shapes)."""


@dataclass(frozen=True, slots=True, order=True)
class Shape:
    """One combination of masks: prefix lengths of both addresses and ports, protocol wildcard."""

    family: int
    src_plen: int
    dst_plen: int
    sport_plen: int
    dport_plen: int
    proto_wild: bool


@dataclass(slots=True)
class Entry:
    """The best rule for one masked key of a shape."""

    score: int  # rule.score + 1: 0 is "no match" in the kernel
    rule_id: int
    action: int


# (direction, protocol or 0, masked sport, masked dport, masked src int, masked dst int)
EntryKey = tuple[int, int, int, int, int, int]


@dataclass
class FamilyTables:
    """Shapes of one family in probe order, and their entries."""

    shapes: list[Shape] = field(default_factory=list)
    max_scores: list[int] = field(default_factory=list)
    entries: list[dict[EntryKey, Entry]] = field(default_factory=list)

    @property
    def entry_count(self) -> int:
        return sum(len(e) for e in self.entries)


@dataclass
class CompiledPolicy:
    """What the datapath writes into one bank."""

    default_action: int
    v4: FamilyTables
    v6: FamilyTables
    rule_ids: list[int]

    def family(self, family: int) -> FamilyTables:
        return self.v4 if family == 4 else self.v6

    @property
    def shape_count(self) -> int:
        return len(self.v4.shapes) + len(self.v6.shapes)

    @property
    def entry_count(self) -> int:
        return self.v4.entry_count + self.v6.entry_count


def port_blocks(ports: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Split an inclusive port range into prefix-aligned (value, prefix length) blocks.

    None (no port condition) is the single block (0, 0). 1024-65535 gives six blocks.
    """
    if ports is None:
        return [(0, 0)]
    lo, hi = ports
    blocks: list[tuple[int, int]] = []
    while lo <= hi:
        size = (lo & -lo) if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        blocks.append((lo, 17 - size.bit_length()))
        lo += size
    return blocks


def _net(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None, family: int
) -> tuple[int, int] | None:
    """(network as int, prefix length) of a rule address in `family`, None if it cannot match."""
    if net is None:
        return 0, 0
    if net.version != family:
        return None
    return int(net.network_address), net.prefixlen


def _rule_entries(rule: Rule) -> Iterator[tuple[Shape, EntryKey]]:
    ports_cond = rule.src_ports is not None or rule.dst_ports is not None
    proto = rule.proto_number
    if proto is not None:
        protos: tuple[int, ...] = (proto,)
    elif ports_cond:
        # A port condition is met only by TCP and UDP: "any" narrows to those two.
        protos = (PROTO_TCP, PROTO_UDP)
    else:
        protos = (0,)
    proto_wild = proto is None and not ports_cond
    sblocks = port_blocks(rule.src_ports)
    dblocks = port_blocks(rule.dst_ports)
    for family in (4, 6):
        # icmp/icmpv6 tie an any-address rule to one family: IPv6 next header 1 is not `icmp`.
        if family not in rule.families:
            continue
        src = _net(rule.src_net, family)
        dst = _net(rule.dst_net, family)
        if src is None or dst is None:
            continue
        for sport, splen in sblocks:
            for dport, dplen in dblocks:
                shape = Shape(family, src[1], dst[1], splen, dplen, proto_wild)
                for direction in _DIRS[rule.direction.value]:
                    for p in protos:
                        yield shape, (direction, p, sport, dport, src[0], dst[0])


def compile_policy(policy: PolicySet, max_shapes: int) -> CompiledPolicy:
    """Compile a policy set; raises CompileError when a family needs more than max_shapes."""
    tables: dict[int, dict[Shape, dict[EntryKey, Entry]]] = {4: {}, 6: {}}
    for rule in policy.policies:
        score = rule.score + 1
        action = ACTION_CODES[rule.action]
        for shape, key in _rule_entries(rule):
            entries = tables[shape.family].setdefault(shape, {})
            cur = entries.get(key)
            # Two rules on one key match exactly the same packets: the better one decides.
            if cur is None or score > cur.score:
                entries[key] = Entry(score, rule.rule_id, action)
    out: dict[int, FamilyTables] = {}
    for family, shapes in tables.items():
        if len(shapes) > max_shapes:
            raise CompileError(
                f"the policy needs {len(shapes)} distinct IPv{family} rule shapes (combinations"
                f" of prefix lengths, port blocks and protocol wildcard); at most {max_shapes}"
                " are supported: use fewer distinct prefix lengths or port ranges"
            )
        ft = FamilyTables()
        # Best first: probing stops once no remaining shape can beat the match in hand.
        ranked = sorted(
            shapes.items(), key=lambda kv: (-max(e.score for e in kv[1].values()), kv[0])
        )
        for shape, entries in ranked:
            ft.shapes.append(shape)
            ft.max_scores.append(max(e.score for e in entries.values()))
            ft.entries.append(entries)
        out[family] = ft
    return CompiledPolicy(
        default_action=DEFAULT_ACTION_CODES[policy.default_action.value],
        v4=out[4],
        v6=out[6],
        rule_ids=[r.rule_id for r in policy.policies],
    )


def _mask(bits: int, plen: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def pack_shape(shape: Shape, max_score: int) -> bytes:
    """struct ms_shape (bpf/classifier.h)."""
    abits = 32 if shape.family == 4 else 128
    alen = abits // 8
    src = _mask(abits, shape.src_plen).to_bytes(alen, "big").ljust(16, b"\0")
    dst = _mask(abits, shape.dst_plen).to_bytes(alen, "big").ljust(16, b"\0")
    return (
        src
        + dst
        + struct.pack(">HH", _mask(16, shape.sport_plen), _mask(16, shape.dport_plen))
        + struct.pack("<B3xQ", 0 if shape.proto_wild else 0xFF, max_score)
    )


def pack_rule_key(family: int, shape_id: int, key: EntryKey) -> bytes:
    """struct ms_rule_key4 / ms_rule_key6 (bpf/classifier.h)."""
    direction, proto, sport, dport, src, dst = key
    alen = 4 if family == 4 else 16
    return (
        struct.pack("<HBB", shape_id, direction, proto)
        + struct.pack(">HH", sport, dport)
        + src.to_bytes(alen, "big")
        + dst.to_bytes(alen, "big")
    )


def pack_rule_val(entry: Entry, slot: int) -> bytes:
    """struct ms_rule_val (bpf/classifier.h)."""
    return struct.pack("<QIIB7x", entry.score, entry.rule_id, slot, entry.action)
