"""Policy compiler: a validated PolicySet in, the classifier's tuple-space tables out.

Each rule is expanded into hash entries, one per (family, direction, protocol, source port
block, destination port block); entries that share their masks form a *shape*. The kernel
probes one hash lookup per shape, best shape first, so what costs per packet is the number of
distinct shapes, not the number of rules. Pure Python and kernel-free: the datapath packs the
result into maps, tests inspect it directly.

A rule end naming an address group is expanded into each of the group's members (so an empty
group gives no entries: the rule matches nothing).

Staged rules (contract §6) are compiled beside enforce ones: each key holds two winners, the
enforced view's (enforce-mode rules only) and the staged view's (every rule, as if all were
enforced). Both are kept in one int per key and per contribution (see `halves`): the plain
score where the two are the same rule, so a set without staged rules costs what it did.
`staged_all` (an agent run with --policy-mode staged) compiles every rule as staged; the
enforced default is then allow and the staged default the set's.

Dropped on the way: nothing that can match. A rule whose addresses are of different families
never matches any packet and produces no entry (the policy model rejects such rules anyway), nor
does a group member of the other family than the rule's other end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
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
from streamer.policy.model import GROUP_END, MAX_RULE_ID, Group, PolicySet, Rule
from streamer.vocabulary import Action, DefaultAction

PROTO_TCP = 6
PROTO_UDP = 17
ACTION_CODES = {Action.ALLOW: MS_ALLOW, Action.DENY: MS_DENY, Action.LOG: MS_LOG}
DEFAULT_ACTION_CODES = {DefaultAction.ALLOW: MS_ALLOW, DefaultAction.DENY: MS_DENY}
# The action rank in a score (streamer.policy.model: deny 2, log 1, allow 0) -> action code.
_RANK_ACTIONS = (MS_ALLOW, MS_LOG, MS_DENY, MS_DENY)

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

ShapeT = tuple[int, int, int, int, int, bool]
"""(family, src_plen, dst_plen, sport_plen, dport_plen, proto_wild): a shape as a tuple."""


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
    """The best rule for one masked key of a shape: the enforced view's (score 0: no enforce
    rule gives the key) and the staged view's (the same rule unless a staged one beats it)."""

    score: int  # rule.score + 1: 0 is "no match" in the kernel
    rule_id: int
    action: int
    s_score: int = 0
    s_rule_id: int = 0
    s_action: int = 0

    @property
    def staged(self) -> bool:
        """The staged view's winner is a staged rule (the views differ on this key)."""
        return self.s_score != self.score


# (direction, protocol or 0, masked sport, masked dport, masked src int, masked dst int)
EntryKey = tuple[int, int, int, int, int, int]


@dataclass
class FamilyTables:
    """Shapes of one family in probe order, the best score of each of their keys, and every
    contribution of the keys that more than one rule or member gives."""

    shapes: list[Shape] = field(default_factory=list)
    max_scores: list[int] = field(default_factory=list)
    scores: list[dict[EntryKey, int]] = field(default_factory=list)
    shared: list[dict[EntryKey, list[int]]] = field(default_factory=list)

    @property
    def entries(self) -> list[dict[EntryKey, Entry]]:
        """The best rule of every key, per shape (for tests and tools: built on each call)."""
        return [{k: entry_of(v) for k, v in found.items()} for found in self.scores]

    @property
    def entry_count(self) -> int:
        return sum(len(e) for e in self.scores)


@dataclass
class CompiledPolicy:
    """A whole set compiled: what the datapath writes into a bank. `merged` maps the natural
    shapes that did not fit to the shape their entries went into."""

    default_action: int  # the set's (MS_ALLOW / MS_DENY)
    v4: FamilyTables
    v6: FamilyTables
    rule_ids: list[int]
    merged: dict[ShapeT, ShapeT] = field(default_factory=dict)
    staged_all: bool = False

    def family(self, family: int) -> FamilyTables:
        return self.v4 if family == 4 else self.v6

    @property
    def enforced_default(self) -> int:
        """The bank's default_action: the set's, or allow when everything is staged."""
        return MS_ALLOW if self.staged_all else self.default_action

    @property
    def staged_default(self) -> int:
        """The bank's staged_default: always the set's."""
        return self.default_action

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
_BLOCK_CACHE: dict[tuple[int, int] | None, list[tuple[int, int]]] = {None: _BLOCKS_NONE}

Addr = tuple[str, int, int, int]
"""An address end as streamer.policy.model parses it: (text, version (0: any), value, prefix)."""


def _blocks(ports: tuple[int, int] | None) -> list[tuple[int, int]]:
    blocks = _BLOCK_CACHE.get(ports)
    if blocks is None:
        if len(_BLOCK_CACHE) > 4096:
            _BLOCK_CACHE.clear()
            _BLOCK_CACHE[None] = _BLOCKS_NONE
        blocks = _BLOCK_CACHE[ports] = port_blocks(ports)
    return blocks


def rule_score(rule: Rule) -> int:
    """The score the kernel stores for the rule's entries (its score + 1: 0 is "no match")."""
    return rule.match_data()[6] + 1


_M64 = (1 << 64) - 1


def contribution(rule: Rule, staged_all: bool = False) -> int:
    """What one entry of `rule` contributes to its key (see `halves`): its score, or for a
    staged rule -(score << 64) (a staged view's winner without an enforced one)."""
    score = rule.match_data()[6] + 1
    return -(score << 64) if staged_all or rule.staged else score


def halves(value: int) -> tuple[int, int]:
    """(enforced score, staged score) of a key's value or a contribution: a positive value is
    both; a negative one is -(staged << 64 | enforced), the enforced 0 when no enforce rule
    gives the key. The staged score is never below the enforced one."""
    if value > 0:
        return value, value
    u = -value
    return u & _M64, u >> 64


def top(value: int) -> int:
    """The best score of either view in a value (the staged one): what shapes are ranked by."""
    return value if value >= 0 else -value >> 64


def combine(a: int, b: int) -> int:
    """The value of a key two values (or contributions) share: the better of each half."""
    if a > 0 and b > 0:
        return a if a >= b else b
    ea, sa = halves(a)
    eb, sb = halves(b)
    e = ea if ea >= eb else eb
    st = sa if sa >= sb else sb
    return st if e == st else -(st << 64 | e)


def value_of(contributions: list[int]) -> int:
    """A key's value from all its contributions (0: none)."""
    if not contributions:
        return 0
    if min(contributions) > 0:
        return max(contributions)
    v = contributions[0]
    for c in contributions[1:]:
        v = combine(v, c)
    return v


def rule_ends(
    rule: Rule, groups: Mapping[str, Group] | None = None
) -> tuple[list[Addr], list[Addr]]:
    """The rule's source and destination ends: its address, or a group end's members (none
    for an empty group: the rule matches nothing)."""
    src, dst = rule.match_data()[:2]
    srcs = (groups or {})[src[0]].addrs() if src[1] == GROUP_END else [src]
    dsts = (groups or {})[dst[0]].addrs() if dst[1] == GROUP_END else [dst]
    return srcs, dsts


def rule_entries(
    rule: Rule, srcs: Iterable[Addr], dsts: Iterable[Addr]
) -> Iterator[tuple[ShapeT, EntryKey]]:
    """(natural shape, key) of every entry `rule` gives for these source and destination ends.

    A pair of ends of different families, or of a family the rule's protocol is not of, gives
    none; an empty end list gives none (an empty group matches nothing)."""
    _, _, sports, dports, proto, families, _ = rule.match_data()
    ports_cond = sports is not None or dports is not None
    if proto is not None:
        protos: tuple[int, ...] = (proto,)
    elif ports_cond:
        # A port condition is met only by TCP and UDP: "any" narrows to those two.
        protos = (PROTO_TCP, PROTO_UDP)
    else:
        protos = (0,)
    proto_wild = proto is None and not ports_cond
    sblocks = _blocks(sports)
    dblocks = _blocks(dports)
    dirs = _DIRS[rule.direction.value]
    dst_list = dsts if isinstance(dsts, list) else list(dsts)
    for src in srcs:
        for dst in dst_list:
            # An "any" address (version 0) is the family's /0; a pair whose protocol or
            # addresses belong to one family has entries only in that one.
            for family in (4, 6):
                if family not in families or src[1] not in (0, family) or dst[1] not in (0, family):
                    continue
                svalue, splen = (src[2], src[3]) if src[1] else (0, 0)
                dvalue, dplen = (dst[2], dst[3]) if dst[1] else (0, 0)
                for sport, sportlen in sblocks:
                    for dport, dportlen in dblocks:
                        shape_t = (family, splen, dplen, sportlen, dportlen, proto_wild)
                        for direction in dirs:
                            for p in protos:
                                yield shape_t, (direction, p, sport, dport, svalue, dvalue)


def compile_policy(policy: PolicySet, max_shapes: int, staged_all: bool = False) -> CompiledPolicy:
    """Compile a policy set; raises CompileError when a family needs more than max_shapes.
    `staged_all`: every rule as staged (--policy-mode staged).

    Works on plain tuples and reads each rule's match data once; shapes become Shape objects
    only at the end. Besides the best value of every key it keeps, for the keys more than one
    rule (or group member) gives, every contribution (`shared`), so that a later change can
    remove one and find the next best (streamer.datapath.ruletables).
    """
    # shape tuple -> {entry key: best score}; shared: shape tuple -> {key: [scores]}
    tables: dict[ShapeT, dict[EntryKey, int]] = {}
    shared: dict[ShapeT, dict[EntryKey, list[int]]] = {}
    any_staged = False
    for rule in policy.policies:
        score = contribution(rule, staged_all)  # one int object shared by all its entries
        if score < 0:
            any_staged = True
        srcs, dsts = rule_ends(rule, policy.groups)
        last_t: ShapeT | None = None
        entries: dict[EntryKey, int] = {}
        for shape_t, key in rule_entries(rule, srcs, dsts):
            if shape_t != last_t:
                got = tables.get(shape_t)
                if got is None:
                    got = tables[shape_t] = {}
                entries, last_t = got, shape_t
            cur = entries.get(key)
            if cur is None:
                entries[key] = score
                continue
            # Two contributions on one key match the same packets: the better decides.
            by_key = shared.setdefault(shape_t, {})
            lst = by_key.get(key)
            if lst is None:
                by_key[key] = [cur, score]
            else:
                lst.append(score)
            if cur > 0 and score > 0:
                if score > cur:
                    entries[key] = score
            else:
                entries[key] = combine(cur, score)
    merged: dict[ShapeT, ShapeT] = {}
    for family in (4, 6):
        _fit_shapes(tables, shared, merged, family, max_shapes)
    out: dict[int, FamilyTables] = {4: FamilyTables(), 6: FamilyTables()}
    ranked: dict[int, list[tuple[int, Shape, dict[EntryKey, int], dict[EntryKey, list[int]]]]]
    ranked = {4: [], 6: []}
    for key_t, found in tables.items():
        sh = Shape(*key_t)
        best = max(map(top, found.values())) if any_staged else max(found.values())
        ranked[sh.family].append((best, sh, found, shared.get(key_t, {})))
    for family, items in ranked.items():
        # Best first: probing stops once no remaining shape can beat the match in hand.
        items.sort(key=lambda it: (-it[0], it[1]))
        ft = out[family]
        for best, sh, found, found_shared in items:
            ft.shapes.append(sh)
            ft.max_scores.append(best)
            ft.scores.append(found)
            ft.shared.append(found_shared)
    return CompiledPolicy(
        default_action=DEFAULT_ACTION_CODES[policy.default_action],
        v4=out[4],
        v6=out[6],
        rule_ids=[r.rule_id for r in policy.policies],
        merged=merged,
        staged_all=staged_all,
    )


def _rule_of(score: int) -> tuple[int, int]:
    """(rule_id, action) a stored score stands for (the score encodes both); (0, 0) for 0."""
    if not score:
        return 0, 0
    low = (score - 1) & 0xFFFFFFFF
    rank = ((score - 1) >> 32) & 3
    return MAX_RULE_ID - low, _RANK_ACTIONS[rank]


def entry_of(value: int) -> Entry:
    """The Entry (both views' rule_id and action) a key's value stands for."""
    e, st = halves(value)
    rid, action = _rule_of(e)
    if e == st:
        return Entry(e, rid, action, e, rid, action)
    s_rid, s_action = _rule_of(st)
    return Entry(e, rid, action, st, s_rid, s_action)


def _dims(shape: ShapeT) -> tuple[int, int, int, int]:
    return shape[1], shape[2], shape[3], shape[4]


def _expand(key: EntryKey, frm: ShapeT, to: ShapeT) -> list[EntryKey]:
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


def _merge_into(
    tables: dict[ShapeT, dict[EntryKey, int]],
    shared: dict[ShapeT, dict[EntryKey, list[int]]],
    merged: dict[ShapeT, ShapeT],
    frm: ShapeT,
    to: ShapeT,
) -> None:
    source = tables.pop(frm)  # first: `to` may be `frm` itself (a join it contains)
    source_shared = shared.pop(frm, {})
    target = tables.setdefault(to, {})
    target_shared = shared.setdefault(to, {})
    for key, best in source.items():
        contributions = source_shared.get(key) or [best]
        for k in _expand(key, frm, to):
            for score in contributions:
                cur = target.get(k)
                if cur is None:
                    target[k] = score
                    continue
                lst = target_shared.get(k)
                if lst is None:
                    target_shared[k] = [cur, score]
                else:
                    lst.append(score)
                if cur > 0 and score > 0:
                    if score > cur:
                        target[k] = score
                else:
                    target[k] = combine(cur, score)
    if not target_shared:
        del shared[to]
    # Every natural shape that lived in `frm` lives in `to` from now on.
    for natural, physical in merged.items():
        if physical == frm:
            merged[natural] = to
    if frm != to:
        merged[frm] = to


def _fit_shapes(
    tables: dict[ShapeT, dict[EntryKey, int]],
    shared: dict[ShapeT, dict[EntryKey, list[int]]],
    merged: dict[ShapeT, ShapeT],
    family: int,
    max_shapes: int,
) -> None:
    """Merge shapes of `family` until at most max_shapes remain (`merged` records where each
    natural shape went).

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
        best: tuple[int, ShapeT, ShapeT | None] | None = None
        for other in shapes:
            if other == small or other[5] != small[5]:
                continue
            d_small = sum(_dims(other)) - sum(_dims(small))
            if all(a >= b for a, b in zip(_dims(other), _dims(small), strict=True)):
                cost = n << d_small
                cand: tuple[int, ShapeT, ShapeT | None] = (cost, other, None)
            else:
                join = (
                    family,
                    *(max(a, b) for a, b in zip(_dims(other), _dims(small), strict=True)),
                    small[5],
                )
                join_t: ShapeT = (join[0], join[1], join[2], join[3], join[4], small[5])
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
        _merge_into(tables, shared, merged, small, into)
        if partner is not None:
            _merge_into(tables, shared, merged, partner, into)


def _mask(bits: int, plen: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


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


def pack_shape(
    shape: Shape, max_score: int, bloom_off: int = 0, bloom_log2_bits: int = 0, key_shape: int = 0
) -> bytes:
    """struct ms_shape (bpf/classifier.h); bloom_log2_bits 0: no filter; key_shape: the
    `shape` field of its rules' keys."""
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
        key_shape,
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


def pack_rule_val(entry: Entry, slot: int, s_slot: int | None = None) -> bytes:
    """struct ms_rule_val (bpf/classifier.h): `slot` is the enforced winner's counter slot,
    `s_slot` the staged winner's (None: the same rule's)."""
    return RULE_VAL.pack(
        entry.score,
        entry.rule_id,
        slot if entry.score else 0,
        entry.action,
        entry.s_score,
        entry.s_rule_id,
        slot if s_slot is None else s_slot,
        entry.s_action,
    )
