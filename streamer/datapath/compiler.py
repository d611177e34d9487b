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

from dataclasses import dataclass, field

from streamer.datapath.layout import (
    MS_ALLOW,
    MS_BLOOM_BANK_WORDS,
    MS_DENY,
    MS_DIR_EGRESS,
    MS_DIR_INGRESS,
    MS_LOG,
    RULE_KEY4,
    RULE_KEY6,
    RULE_VAL,
    SHAPE,
)
from streamer.policy.model import PolicySet
from streamer.vocabulary import Action, DefaultAction

PROTO_TCP = 6
PROTO_UDP = 17
ACTION_CODES = {Action.ALLOW: MS_ALLOW, Action.DENY: MS_DENY, Action.LOG: MS_LOG}
DEFAULT_ACTION_CODES = {DefaultAction.ALLOW: MS_ALLOW, DefaultAction.DENY: MS_DENY}

_DIRS = {
    "ingress": (MS_DIR_INGRESS,),
    "egress": (MS_DIR_EGRESS,),
    "any": (MS_DIR_INGRESS, MS_DIR_EGRESS),
}


class CompileError(ValueError):
    """The policy cannot be expressed in the classifier's tables (too many entries)."""


# Merging shapes multiplies entries; past this many a set is refused rather than let grow
# without bound (the kernel's rule tables hold 4M entries for both banks).
MAX_ENTRIES_PER_SET = 1 << 21

_ShapeT = tuple[int, int, int, int, int, bool]
_Val = tuple[int, int, int]


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


_BLOCKS_NONE: list[tuple[int, int]] = [(0, 0)]


def compile_policy(policy: PolicySet, max_shapes: int) -> CompiledPolicy:
    """Compile a policy set; raises CompileError when a family needs more than max_shapes.

    This runs on every change of a 100,000-rule set, so it works on plain tuples and reads
    each rule's match data once; shapes become Shape objects only at the end.
    """
    # shape tuple (family, src_plen, dst_plen, sport_plen, dport_plen, proto_wild) ->
    #   {entry key: (score, rule_id, action)}
    tables: dict[_ShapeT, dict[EntryKey, _Val]] = {}
    block_cache: dict[tuple[int, int] | None, list[tuple[int, int]]] = {None: _BLOCKS_NONE}
    for rule in policy.policies:
        src, dst, sports, dports, proto, families, score = rule.match_data()
        val = (score + 1, rule.rule_id, ACTION_CODES[rule.action])
        ports_cond = sports is not None or dports is not None
        if proto is not None:
            protos: tuple[int, ...] = (proto,)
        elif ports_cond:
            # A port condition is met only by TCP and UDP: "any" narrows to those two.
            protos = (PROTO_TCP, PROTO_UDP)
        else:
            protos = (0,)
        proto_wild = proto is None and not ports_cond
        sblocks = block_cache.get(sports)
        if sblocks is None:
            sblocks = block_cache[sports] = port_blocks(sports)
        dblocks = block_cache.get(dports)
        if dblocks is None:
            dblocks = block_cache[dports] = port_blocks(dports)
        dirs = _DIRS[rule.direction.value]
        for family in (4, 6):
            # An "any" address (version 0) is the family's /0; a rule whose protocol or
            # addresses belong to one family has no entries in the other.
            if family not in families or src[1] not in (0, family) or dst[1] not in (0, family):
                continue
            svalue, splen = (src[2], src[3]) if src[1] else (0, 0)
            dvalue, dplen = (dst[2], dst[3]) if dst[1] else (0, 0)
            for sport, sportlen in sblocks:
                for dport, dportlen in dblocks:
                    shape_t = (family, splen, dplen, sportlen, dportlen, proto_wild)
                    entries = tables.get(shape_t)
                    if entries is None:
                        entries = tables[shape_t] = {}
                    for direction in dirs:
                        for p in protos:
                            key = (direction, p, sport, dport, svalue, dvalue)
                            cur = entries.get(key)
                            # Two rules on one key match the same packets: the better decides.
                            if cur is None or val[0] > cur[0]:
                                entries[key] = val
    for family in (4, 6):
        _fit_shapes(tables, family, max_shapes)
    out: dict[int, FamilyTables] = {4: FamilyTables(), 6: FamilyTables()}
    ranked: dict[int, list[tuple[int, Shape, dict[EntryKey, tuple[int, int, int]]]]] = {
        4: [],
        6: [],
    }
    for key_t, found in tables.items():
        sh = Shape(*key_t)
        ranked[sh.family].append((max(v[0] for v in found.values()), sh, found))
    for family, items in ranked.items():
        # Best first: probing stops once no remaining shape can beat the match in hand.
        items.sort(key=lambda it: (-it[0], it[1]))
        ft = out[family]
        for best, sh, found in items:
            ft.shapes.append(sh)
            ft.max_scores.append(best)
            ft.entries.append({k: Entry(*v) for k, v in found.items()})
    return CompiledPolicy(
        default_action=DEFAULT_ACTION_CODES[policy.default_action],
        v4=out[4],
        v6=out[6],
        rule_ids=[r.rule_id for r in policy.policies],
    )


def _dims(shape: _ShapeT) -> tuple[int, int, int, int]:
    return shape[1], shape[2], shape[3], shape[4]


def _expand(key: EntryKey, frm: _ShapeT, to: _ShapeT) -> list[EntryKey]:
    """The keys of shape `to` (at least as long a prefix in every dimension) covering `key`."""
    abits = 32 if frm[0] == 4 else 128
    direction, proto, sport, dport, src, dst = key

    def values(value: int, bits: int, old: int, new: int) -> list[int]:
        return [value | (i << (bits - new)) for i in range(1 << (new - old))]

    return [
        (direction, proto, sp, dp, sv, dv)
        for sv in values(src, abits, frm[1], to[1])
        for dv in values(dst, abits, frm[2], to[2])
        for sp in values(sport, 16, frm[3], to[3])
        for dp in values(dport, 16, frm[4], to[4])
    ]


def _merge_into(tables: dict[_ShapeT, dict[EntryKey, _Val]], frm: _ShapeT, to: _ShapeT) -> None:
    source = tables.pop(frm)  # first: `to` may be `frm` itself (a join it contains)
    target = tables.setdefault(to, {})
    for key, val in source.items():
        for k in _expand(key, frm, to):
            cur = target.get(k)
            if cur is None or val[0] > cur[0]:
                target[k] = val


def _fit_shapes(tables: dict[_ShapeT, dict[EntryKey, _Val]], family: int, max_shapes: int) -> None:
    """Merge shapes of `family` until at most max_shapes remain.

    A shape's entries can always be rewritten as entries of a shape with longer prefixes in
    every dimension (each key expands into the keys covering it), so no policy is refused for
    its number of shapes, only for the entries that merging would take. Greedy: the shape with
    the fewest entries goes into the cheapest shape that contains it, or into the join with
    its nearest neighbour.
    """
    while True:
        shapes = [sh for sh in tables if sh[0] == family]
        if len(shapes) <= max_shapes:
            return
        small = min(shapes, key=lambda sh: (len(tables[sh]), sh))
        n = len(tables[small])
        best: tuple[int, _ShapeT, _ShapeT | None] | None = None
        for other in shapes:
            if other == small or other[5] != small[5]:
                continue
            d_small = sum(_dims(other)) - sum(_dims(small))
            if all(a >= b for a, b in zip(_dims(other), _dims(small), strict=True)):
                cost = n << d_small
                cand: tuple[int, _ShapeT, _ShapeT | None] = (cost, other, None)
            else:
                join = (
                    family,
                    *(max(a, b) for a, b in zip(_dims(other), _dims(small), strict=True)),
                    small[5],
                )
                join_t: _ShapeT = (join[0], join[1], join[2], join[3], join[4], small[5])
                cost = (n << (sum(_dims(join_t)) - sum(_dims(small)))) + (
                    len(tables[other]) << (sum(_dims(join_t)) - sum(_dims(other)))
                )
                cand = (cost, join_t, other)
            if best is None or cand[0] < best[0]:
                best = cand
        if best is None:
            # Only shapes with the other protocol wildcard are left: rare enough to refuse.
            raise CompileError(
                f"the policy needs more than {max_shapes} IPv{family} rule shapes and they"
                " cannot be merged: use fewer distinct prefix lengths or port ranges"
            )
        cost, into, partner = best
        if sum(len(v) for v in tables.values()) + cost > MAX_ENTRIES_PER_SET:
            raise CompileError(
                f"the policy needs {len(shapes)} distinct IPv{family} rule shapes"
                " (combinations of prefix lengths, port blocks and protocol wildcard); fitting"
                f" them into the classifier's {max_shapes} would take more than"
                f" {MAX_ENTRIES_PER_SET} table entries: use fewer distinct prefix lengths or"
                " port ranges"
            )
        _merge_into(tables, small, into)
        if partner is not None:
            _merge_into(tables, partner, into)


def _mask(bits: int, plen: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


_M64 = (1 << 64) - 1
BLOOM_BITS_PER_ENTRY = 16  # ~6 % false positives with one hash
BLOOM_MIN_BITS = 64
BLOOM_MAX_BITS = 1 << 22


def _mix(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    h ^= h >> 33
    return h


def key_hash(family: int, key: bytes) -> int:
    """The classifier's bloom hash of a packed rule key: ms_mix and ms_ports_word, combined as
    judge_family in bpf/classifier.c does.

    The kernel loads the key's fields as little-endian words, so this reads the same bytes.
    """
    ports = (
        int.from_bytes(key[4:6], "little") << 48
        | int.from_bytes(key[6:8], "little") << 32
        | key[3] << 8
        | key[2]
    )
    if family == 4:
        h = _mix(int.from_bytes(key[8:12], "little") << 32 | int.from_bytes(key[12:16], "little"))
        return _mix(h ^ ports)
    h = _mix(int.from_bytes(key[8:16], "little"))
    for off in (16, 24, 32):
        h = _mix(h ^ int.from_bytes(key[off : off + 8], "little"))
    return _mix(h ^ ports)


def bloom_layout(entry_counts: list[int]) -> list[tuple[int, int]]:
    """(first word, log2 bits) of each shape's filter within one bank's words.

    About 16 bits per entry, a power of two; scaled down together when a large set would not
    fit the bank (the filters then just pass more keys on to the hash probe).
    """
    per_entry = BLOOM_BITS_PER_ENTRY
    while True:
        sizes = [
            min(BLOOM_MAX_BITS, max(BLOOM_MIN_BITS, 1 << max(0, (n * per_entry - 1).bit_length())))
            for n in entry_counts
        ]
        if sum(sizes) // 64 <= MS_BLOOM_BANK_WORDS or per_entry == 0:
            break
        per_entry //= 2
    layout: list[tuple[int, int]] = []
    off = 0
    for bits in sizes:
        if off + bits // 64 > MS_BLOOM_BANK_WORDS:
            layout.append((0, 0))  # no room left: this shape is always probed
            continue
        layout.append((off, bits.bit_length() - 1))
        off += bits // 64
    return layout


def build_bloom(family: int, keys: list[bytes], log2_bits: int) -> bytes:
    """A shape's filter as little-endian 64-bit words."""
    arr = bytearray((1 << log2_bits) // 8)
    shift = 64 - log2_bits
    for k in keys:
        bit = key_hash(family, k) >> shift
        arr[bit >> 3] |= 1 << (bit & 7)
    return bytes(arr)


def pack_shape(shape: Shape, max_score: int, bloom_off: int = 0, bloom_log2_bits: int = 0) -> bytes:
    """struct ms_shape (bpf/classifier.h); bloom_log2_bits 0: no filter."""
    abits = 32 if shape.family == 4 else 128
    alen = abits // 8
    return SHAPE.pack(
        _mask(abits, shape.src_plen).to_bytes(alen, "big"),  # padded to 16 bytes by the pack
        _mask(abits, shape.dst_plen).to_bytes(alen, "big"),
        _mask(16, shape.sport_plen).to_bytes(2, "big"),
        _mask(16, shape.dport_plen).to_bytes(2, "big"),
        0 if shape.proto_wild else 0xFF,
        64 - bloom_log2_bits if bloom_log2_bits else 0,
        max_score,
        bloom_off,
    )


def pack_rule_key(family: int, shape_id: int, key: EntryKey) -> bytes:
    """struct ms_rule_key4 / ms_rule_key6 (bpf/classifier.h)."""
    direction, proto, sport, dport, src, dst = key
    if family == 4:
        return RULE_KEY4.pack(
            shape_id,
            direction,
            proto,
            sport.to_bytes(2, "big"),
            dport.to_bytes(2, "big"),
            src.to_bytes(4, "big"),
            dst.to_bytes(4, "big"),
        )
    return RULE_KEY6.pack(
        shape_id,
        direction,
        proto,
        sport.to_bytes(2, "big"),
        dport.to_bytes(2, "big"),
        src.to_bytes(16, "big"),
        dst.to_bytes(16, "big"),
    )


def pack_rule_val(entry: Entry, slot: int) -> bytes:
    """struct ms_rule_val (bpf/classifier.h)."""
    return RULE_VAL.pack(entry.score, entry.rule_id, slot, entry.action)
