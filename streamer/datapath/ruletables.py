"""The live rule tables, mirrored in Python and changed in place: what both banks hold.

In: a CompiledPolicy (a whole set: `RuleTables.build`), then changes (`TableChange`: a rule's
entries added or removed for given source and destination ends, a new default action). Out:
for each change a `TableDelta` of kernel writes: the rule-map entries to write and to delete,
the shapes of a family when their probe order or filters changed, bloom words, the bank
header. A delta is the same for either bank, so the datapath writes it into the idle bank,
flips, and once no program reads the other bank any more writes it there too
(streamer.datapath.banks). A change costs what it touches: the keys of the contributions it
adds or removes, and (rarely) a scan of one shape whose best score it removed.

A key's *contributions* are every (rule, source end, destination end) giving it (one rule with
two overlapping group members can give a key twice); its best score decides, in each view: a
key's value holds the enforced and the staged view's winner, a staged rule's contribution only
the staged view's (streamer.datapath.compiler.halves). Keys with one contribution keep only it
(`best`); the others also keep all of theirs (`shared`), so that removing the best finds the
next. A rule changing mode is removed as it was and added as it is. Keys hold the shape's
stable id; a bank's copy puts bank * max_shapes + id in the key's `shape` field. `staged_all`
(--policy-mode staged) is a property of the tables: every rule a change adds or removes is
taken as staged, and the enforced default is allow.

Not done incrementally: a new natural shape when the family already has max_shapes shapes
(which ones to merge is a whole-set decision: NeedsRecompile). Bloom bits of removed keys stay
set until the next whole-set compile (a filter only passes more keys on to the hash probe), and
a shape that grows past what its filter was sized for keeps it (more false positives).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import astuple, dataclass, field

from streamer.datapath.compiler import (
    BLOOM_BITS_PER_ENTRY,
    BLOOM_MAX_BITS,
    BLOOM_MIN_BITS,
    Addr,
    CompiledPolicy,
    Shape,
    ShapeT,
    _expand,
    bloom_layout,
    contribution,
    key_hash,
    pack_rule_key,
    rule_entries,
    value_of,
)
from streamer.datapath.compiler import top as top_score
from streamer.datapath.layout import MS_ALLOW, MS_BLOOM_BANK_WORDS
from streamer.policy.model import Rule

_SHAPE_FIELD = struct.Struct("<H")


class NeedsRecompile(Exception):
    """The change cannot be made in place (a shape beyond max_shapes): compile the whole set."""


class TablesOutOfStep(Exception):
    """A removal named a contribution the tables do not hold: compile the whole set."""


@dataclass(slots=True, eq=False)
class LiveShape:
    """One shape of the live tables: its keys' values and shared contributions; max_score is
    the best score of either view in it (`top`)."""

    shape: Shape
    sid: int  # stable id: the key's `shape` field is bank * max_shapes + sid
    best: dict[bytes, int] = field(default_factory=dict)
    shared: dict[bytes, list[int]] = field(default_factory=dict)
    max_score: int = 0
    bloom_off: int = 0  # first word within a bank's part of `blooms`
    bloom_log2: int = 0  # log2 of the filter's bits; 0: no filter (always probed)


@dataclass(frozen=True, slots=True)
class ShapeRow:
    """One entry of a family's shapes array, in probe order."""

    shape: Shape
    sid: int
    max_score: int
    bloom_off: int
    bloom_log2: int


@dataclass
class FamilyDelta:
    """One family's kernel writes: `upserts` key -> value, `deletes`, and the whole shapes
    array (probe order) when it changed (None: unchanged)."""

    upserts: dict[bytes, int] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)
    shapes: list[ShapeRow] | None = None


@dataclass
class TableDelta:
    """The kernel writes of one change, for either bank."""

    v4: FamilyDelta
    v6: FamilyDelta
    bloom_words: dict[int, int]  # word index within a bank's part -> value
    default_action: int  # the bank's (enforced view's) default
    nshapes: tuple[int, int]
    new_rules: set[int]
    gone_rules: set[int]
    staged_default: int = MS_ALLOW

    def family(self, family: int) -> FamilyDelta:
        return self.v4 if family == 4 else self.v6

    @property
    def entry_writes(self) -> int:
        return sum(len(f.upserts) + len(f.deletes) for f in (self.v4, self.v6))


def bank_key(key: bytes, bank: int, max_shapes: int) -> bytes:
    """A key of the tables as bank `bank` holds it."""
    sid = _SHAPE_FIELD.unpack_from(key)[0]
    return _SHAPE_FIELD.pack(bank * max_shapes + sid) + key[2:]


class FamilyState:
    """The shapes of one family: by shape tuple, in probe order, and where merged ones went."""

    def __init__(self, family: int, max_shapes: int) -> None:
        self.family = family
        self.shapes: dict[ShapeT, LiveShape] = {}
        self.order: list[LiveShape] = []
        self.merged: dict[ShapeT, ShapeT] = {}
        self.free: list[int] = list(range(max_shapes - 1, -1, -1))  # pop() gives the lowest

    def rows(self) -> list[ShapeRow]:
        return [
            ShapeRow(s.shape, s.sid, s.max_score, s.bloom_off, s.bloom_log2) for s in self.order
        ]

    @property
    def entry_count(self) -> int:
        return sum(len(s.best) for s in self.order)


def _order_key(s: LiveShape, max_score: int) -> tuple[int, Shape]:
    return (-max_score, s.shape)


class RuleTables:
    """The tables both banks hold (once the lagging one caught up), in Python."""

    def __init__(self, max_shapes: int, default_action: int, staged_all: bool = False) -> None:
        self.max_shapes = max_shapes
        self.default_action = default_action  # the set's
        self.staged_all = staged_all
        self.fam = {4: FamilyState(4, max_shapes), 6: FamilyState(6, max_shapes)}
        self.bloom = bytearray(MS_BLOOM_BANK_WORDS * 8)  # both banks' filters: one copy
        self.bloom_top = 0  # words in use (regions above are free)
        self.rule_ids: set[int] = set()

    @classmethod
    def build(cls, compiled: CompiledPolicy, max_shapes: int) -> RuleTables:
        """The tables of a whole compiled set (shape ids in probe order, filters laid out)."""
        t = cls(max_shapes, compiled.default_action, compiled.staged_all)
        t.rule_ids = set(compiled.rule_ids)
        layout = bloom_layout([len(e) for f in (4, 6) for e in compiled.family(f).scores])
        n = 0
        for family in (4, 6):
            ft = compiled.family(family)
            fs = t.fam[family]
            for i, (shape, mx, scores, shared) in enumerate(
                zip(ft.shapes, ft.max_scores, ft.scores, ft.shared, strict=True)
            ):
                off, log2 = layout[n]
                n += 1
                ls = LiveShape(shape, i, max_score=mx, bloom_off=off, bloom_log2=log2)
                best = ls.best
                for k, v in scores.items():
                    best[pack_rule_key(family, i, k)] = v
                for k, lst in shared.items():
                    ls.shared[pack_rule_key(family, i, k)] = lst
                if log2:
                    t._set_bits(ls, best)
                    t.bloom_top = max(t.bloom_top, off + (1 << log2) // 64)
                fs.shapes[astuple(shape)] = ls
                fs.order.append(ls)
            fs.free = [s for s in fs.free if s >= len(ft.shapes)]
            fs.merged = {k: v for k, v in compiled.merged.items() if k[0] == family}
        return t

    def _set_bits(self, ls: LiveShape, keys: Iterable[bytes]) -> None:
        arr = self.bloom
        shift = 64 - ls.bloom_log2
        base = ls.bloom_off * 8
        family = ls.shape.family
        for k in keys:
            bit = key_hash(family, k) >> shift
            arr[base + (bit >> 3)] |= 1 << (bit & 7)

    # ---- reading -----------------------------------------------------------------------------

    @property
    def enforced_default(self) -> int:
        """The bank's default_action: the set's, or allow when everything is staged."""
        return MS_ALLOW if self.staged_all else self.default_action

    @property
    def staged_default(self) -> int:
        """The bank's staged_default: the set's."""
        return self.default_action

    @property
    def shape_count(self) -> int:
        return len(self.fam[4].order) + len(self.fam[6].order)

    @property
    def entry_count(self) -> int:
        return self.fam[4].entry_count + self.fam[6].entry_count

    def entries(self, family: int) -> int:
        return self.fam[family].entry_count

    def bloom_word(self, index: int) -> int:
        return int.from_bytes(self.bloom[index * 8 : index * 8 + 8], "little")

    def begin(self) -> TableChange:
        """A change to build up; nothing here moves until `TableChange.commit`."""
        return TableChange(self)


class TableChange:
    """Contributions added and removed, computed against the tables without touching them:
    `finish` gives the kernel writes, `commit` (once the kernel took them) moves the tables."""

    def __init__(self, tables: RuleTables) -> None:
        self._t = tables
        self._touched: dict[LiveShape, dict[bytes, list[int]]] = {}
        self._new: dict[tuple[int, ShapeT], LiveShape] = {}  # shapes this change creates
        self._last: tuple[ShapeT, LiveShape, ShapeT] | None = None
        self.default_action = tables.default_action  # the set's: a change may set it
        self.new_rules: set[int] = set()
        self.gone_rules: set[int] = set()
        self._finished: _Finished | None = None

    # ---- building ----------------------------------------------------------------------------

    def add_rule(self, rule: Rule, srcs: list[Addr], dsts: list[Addr]) -> None:
        """A rule new to the set, with its ends (group ends resolved to their members)."""
        self.new_rules.add(rule.rule_id)
        self.gone_rules.discard(rule.rule_id)
        self.add(rule, srcs, dsts)

    def remove_rule(self, rule: Rule, srcs: list[Addr], dsts: list[Addr]) -> None:
        """A rule leaving the set, with the ends it had."""
        self.remove(rule, srcs, dsts)
        if rule.rule_id in self.new_rules:
            self.new_rules.discard(rule.rule_id)
        else:
            self.gone_rules.add(rule.rule_id)

    def add(self, rule: Rule, srcs: list[Addr], dsts: list[Addr]) -> None:
        """The entries of `rule` for these ends (e.g. new members of a group it uses)."""
        self._apply(rule, srcs, dsts, True)

    def remove(self, rule: Rule, srcs: list[Addr], dsts: list[Addr]) -> None:
        """The entries of `rule` for these ends, as they were added."""
        self._apply(rule, srcs, dsts, False)

    def _apply(self, rule: Rule, srcs: list[Addr], dsts: list[Addr], adding: bool) -> None:
        if self._finished is not None:
            raise RuntimeError("the change is finished")
        score = contribution(rule, self._t.staged_all)
        touched = self._touched
        for shape_t, key in rule_entries(rule, srcs, dsts):
            last = self._last
            if last is not None and last[0] == shape_t:
                _, ls, phys = last
            else:
                ls, phys = self._shape_for(shape_t, adding)
                self._last = (shape_t, ls, phys)
            family = shape_t[0]
            keys = [key] if phys == shape_t else _expand(key, shape_t, phys)
            by_key = touched.get(ls)
            if by_key is None:
                by_key = touched[ls] = {}
            for k in keys:
                kb = pack_rule_key(family, ls.sid, k)
                lst = by_key.get(kb)
                if lst is None:
                    held = ls.shared.get(kb)
                    if held is not None:
                        lst = list(held)
                    else:
                        cur = ls.best.get(kb)
                        lst = [cur] if cur is not None else []
                    by_key[kb] = lst
                if adding:
                    lst.append(score)
                else:
                    try:
                        lst.remove(score)
                    except ValueError:
                        raise TablesOutOfStep(
                            f"rule {rule.rule_id} has no entry {k} in shape {ls.shape}"
                        ) from None

    def _shape_for(self, shape_t: ShapeT, adding: bool) -> tuple[LiveShape, ShapeT]:
        family = shape_t[0]
        fs = self._t.fam[family]
        phys = fs.merged.get(shape_t, shape_t)
        ls = fs.shapes.get(phys) or self._new.get((family, phys))
        if ls is not None:
            return ls, phys
        if not adding:
            raise TablesOutOfStep(f"no shape {phys} to remove entries from")
        taken = sum(1 for f, _ in self._new if f == family)
        if taken >= len(fs.free):
            raise NeedsRecompile(
                f"a new IPv{family} rule shape beyond the {self._t.max_shapes} the classifier"
                " probes: the whole set is compiled again (shapes get merged)"
            )
        ls = LiveShape(Shape(*phys), fs.free[-1 - taken])
        self._new[(family, phys)] = ls
        return ls, phys

    # ---- the kernel writes and the commit ------------------------------------------------

    def finish(self) -> TableDelta:
        """The kernel writes of this change (computed once; the tables do not move)."""
        if self._finished is not None:
            return self._finished.delta
        t = self._t
        deltas = {4: FamilyDelta(), 6: FamilyDelta()}
        words: dict[int, int] = {}
        results: dict[LiveShape, tuple[int, int]] = {}  # shape -> (entries, max score)
        new_keys: dict[LiveShape, list[bytes]] = {}
        for ls, by_key in self._touched.items():
            fd = deltas[ls.shape.family]
            count = len(ls.best)
            lost_max = False
            mx = ls.max_score
            added: list[bytes] = []
            for kb, lst in by_key.items():
                old = ls.best.get(kb, 0)
                new = value_of(lst)
                if new == old:
                    continue
                if new:
                    fd.upserts[kb] = new
                    mx = max(mx, top_score(new))
                    if not old:
                        added.append(kb)
                        count += 1
                else:
                    fd.deletes.append(kb)
                    count -= 1
                if old and top_score(old) == ls.max_score and top_score(new) < top_score(old):
                    lost_max = True
            if lost_max:
                # The best score of the shape went: scan it (one shape, only then).
                mx = 0
                for kb, v in ls.best.items():
                    now = by_key.get(kb)
                    if now is not None:
                        v = value_of(now)
                    t_v = top_score(v)
                    if t_v > mx:
                        mx = t_v
                for kb in added:
                    mx = max(mx, top_score(value_of(by_key[kb])))
            results[ls] = (count, mx)
            new_keys[ls] = added
        top = t.bloom_top
        changed_families: set[int] = set()
        for ls, (count, mx) in results.items():
            family = ls.shape.family
            is_new = (family, astuple(ls.shape)) in self._new
            if is_new and count:
                # A region of its own for the new shape's filter, when there is room.
                bits = min(
                    BLOOM_MAX_BITS,
                    max(
                        BLOOM_MIN_BITS, 1 << max(0, (count * BLOOM_BITS_PER_ENTRY - 1).bit_length())
                    ),
                )
                if top + bits // 64 <= MS_BLOOM_BANK_WORDS:
                    ls.bloom_off, ls.bloom_log2 = top, bits.bit_length() - 1
                    top += bits // 64
                    for w in range(ls.bloom_off, top):
                        words[w] = 0
            if is_new or mx != ls.max_score or count == 0:
                changed_families.add(family)
            if ls.bloom_log2 and count:
                shift = 64 - ls.bloom_log2
                for kb in new_keys[ls]:
                    bit = key_hash(family, kb) >> shift
                    w = ls.bloom_off + (bit >> 6)
                    cur = words.get(w)
                    if cur is None:
                        cur = t.bloom_word(w)
                    words[w] = cur | (1 << (bit & 63))
        orders: dict[int, list[tuple[LiveShape, int]]] = {}
        for family in (4, 6):
            fs = t.fam[family]
            if family not in changed_families:
                orders[family] = [(s, s.max_score) for s in fs.order]
                continue
            live = [(s, s.max_score) for s in fs.order if s not in results]
            live += [
                (s, mx) for s, (count, mx) in results.items() if s.shape.family == family and count
            ]
            live.sort(key=lambda it: _order_key(*it))
            orders[family] = live
            deltas[family].shapes = [
                ShapeRow(s.shape, s.sid, mx, s.bloom_off, s.bloom_log2) for s, mx in live
            ]
        delta = TableDelta(
            v4=deltas[4],
            v6=deltas[6],
            bloom_words=words,
            default_action=MS_ALLOW if t.staged_all else self.default_action,
            nshapes=(len(orders[4]), len(orders[6])),
            new_rules=set(self.new_rules),
            gone_rules=set(self.gone_rules),
            staged_default=self.default_action,
        )
        self._finished = _Finished(delta, results, orders, top)
        return delta

    def commit(self) -> None:
        """Move the tables to the state after this change (the kernel holds it now)."""
        fin = self._finished
        if fin is None:
            self.finish()
            fin = self._finished
            assert fin is not None
        t = self._t
        for ls, by_key in self._touched.items():
            best, shared = ls.best, ls.shared
            for kb, lst in by_key.items():
                if not lst:
                    best.pop(kb, None)
                    shared.pop(kb, None)
                elif len(lst) == 1:
                    best[kb] = lst[0]
                    shared.pop(kb, None)
                else:
                    best[kb] = value_of(lst)
                    shared[kb] = lst
        for ls, (count, mx) in fin.results.items():
            ls.max_score = mx
            family = ls.shape.family
            fs = t.fam[family]
            shape_t: ShapeT = astuple(ls.shape)
            if (family, shape_t) in self._new:
                if count:
                    fs.shapes[shape_t] = ls
                    fs.free.remove(ls.sid)
            elif not count:
                del fs.shapes[shape_t]
                fs.free.append(ls.sid)
                ls.bloom_log2 = 0
        for family in (4, 6):
            t.fam[family].order = [s for s, _ in fin.orders[family]]
        for w, v in fin.delta.bloom_words.items():
            t.bloom[w * 8 : w * 8 + 8] = v.to_bytes(8, "little")
        t.bloom_top = fin.top
        t.default_action = self.default_action
        t.rule_ids |= self.new_rules
        t.rule_ids -= self.gone_rules
        self._touched = {}


@dataclass
class _Finished:
    delta: TableDelta
    results: dict[LiveShape, tuple[int, int]]
    orders: dict[int, list[tuple[LiveShape, int]]]
    top: int
