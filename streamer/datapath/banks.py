"""Policy banks: both banks hold the live tables; a change goes into the idle one, then the flip.

In: the live tables (streamer.datapath.ruletables.RuleTables) and their changes (TableDelta),
or a whole new set of tables; the loaded maps. Out: the idle bank written (the delta's entries,
filter words and shapes; or for a whole set: cleared and filled), then `active` switched to it
in one 8-byte write, so a packet is judged by one whole set; then, once no program can still
read the other bank (no judge is counted in for it, Maps.quiesce; beside the caller), the
same writes into that one, which makes the two equal again (`settle` waits for that; every
apply runs one first). A rule entry holds both views' winners (rule, counter slot, action); a
bank header the enforced default and the staged one. Per-rule counter slots are kept across
generations (a rule keeps its counters, staged ones too), zeroed before a new rule uses one and
freed once no bank names the rule; slot 0 is the default action's, 1 failsafe traffic's, rules
get theirs from 2. A bank whose writes failed is *dirty*: before it is used again it is cleared
(by a walk of the maps) and filled whole. On start, `adopt` learns the live generation and rule
slots a previous agent left in the pinned maps (both banks are dirty until the first apply
fills them).
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass

from streamer.datapath.compiler import entry_of, pack_shape
from streamer.datapath.config import DatapathConfig, DatapathError
from streamer.datapath.layout import (
    BANK,
    MS_BLOOM_BANK_WORDS,
    MS_FAILSAFE_SLOT,
    RULE_CTR,
    RULE_KEY4,
    RULE_KEY6,
    RULE_VAL,
    active_of,
    active_word,
)
from streamer.datapath.maps import Maps, array_key
from streamer.datapath.ruletables import (
    RuleTables,
    ShapeRow,
    TableChange,
    TableDelta,
    bank_key,
)

log = logging.getLogger(__name__)

_RULE_ID, _SLOT = RULE_VAL.index("rule_id"), RULE_VAL.index("slot")
_S_RULE_ID, _S_SLOT = RULE_VAL.index("s_rule_id"), RULE_VAL.index("s_slot")
_FIRST_RULE_SLOT = MS_FAILSAFE_SLOT + 1
_SHAPE_FIELD = struct.Struct("<H")
_RULE_KEYS = {4: RULE_KEY4, 6: RULE_KEY6}


@dataclass
class _CatchUp:
    """The other bank being brought level with the live one, beside the caller: its writes
    (a delta, or a whole set replacing `old`), the slots to free after, and what failed."""

    bank: int
    generation: int
    delta: TableDelta | None
    tables: RuleTables
    old: RuleTables | None
    slots: list[int]
    thread: threading.Thread | None = None
    error: BaseException | None = None


class Banks:
    """The two banks of one classifier. `apply_*` serialize themselves (`lock`) and may run in a
    worker thread while readers run elsewhere; `tables` is what both banks hold once level."""

    def __init__(self, maps: Maps, config: DatapathConfig) -> None:
        self._maps = maps
        self._config = config
        self.lock = threading.Lock()
        self.tables: RuleTables | None = None
        self.slots: dict[int, int] = {}  # rule_id -> per-rule counter slot
        self._free_slots: list[int] = []
        self._next_slot = _FIRST_RULE_SLOT
        self._dirty: set[int] = set()  # banks whose contents are not `tables`
        self._catching_up: _CatchUp | None = None
        self._packed_shapes: dict[tuple[ShapeRow, int], bytes] = {}  # (row, bank) -> ms_shape

    def adopt(self) -> bool:
        """Learn what a previous agent left in the pinned maps: the live bank's rule slots
        (both banks count as dirty until the first apply). Whether they held an applied
        generation."""
        gen, bank = self.active()
        ms = self._config.max_shapes
        found = False
        for family in (4, 6):
            name = f"rules{family}"
            for key, val in self._maps.walk(name, _RULE_KEYS[family].size, RULE_VAL.size):
                found = True
                if gen > 0 and _SHAPE_FIELD.unpack_from(key)[0] // ms == bank:
                    v = RULE_VAL.unpack(val)
                    # a half no rule holds (a staged-only key's enforced one) names rule 0
                    if v[_RULE_ID]:
                        self.slots[v[_RULE_ID]] = v[_SLOT]
                    if v[_S_RULE_ID]:
                        self.slots[v[_S_RULE_ID]] = v[_S_SLOT]
        self._dirty = {0, 1} if (found or gen > 0) else set()
        used = set(self.slots.values())
        self._next_slot = max(used, default=_FIRST_RULE_SLOT - 1) + 1
        if gen > 0:
            log.info("adopted pinned state: generation %d, %d rules", gen, len(self.slots))
        return gen > 0

    def active(self) -> tuple[int, int]:
        """(generation, bank) in force; generation 0 means no policy was ever applied."""
        raw = self._maps.lookup("active", array_key(0), 8)
        return active_of(struct.unpack("<Q", raw)[0] if raw else 0)

    def rule_entries(self, family: int) -> int:
        """Entries of the family's rules map, both banks' (a dirty bank's are not known: a
        walk counts them)."""
        if self._dirty:
            return sum(1 for _ in self._maps.keys(f"rules{family}", _RULE_KEYS[family].size))
        if self.tables is None:
            return 0
        n = 2 * self.tables.entries(family)
        job = self._catching_up
        if job is not None and job.delta is None and job.old is not None:
            n += job.old.entries(family) - job.tables.entries(family)  # not level yet
        return max(n, 0)

    # ---- applying ------------------------------------------------------------------------

    def _new_generation(self, gen: int, generation: int | None, keep: bool) -> int:
        if keep and generation is not None and generation == gen:
            return gen
        new_gen = generation if generation is not None else gen + 1
        return new_gen if new_gen > gen else gen + 1

    def apply_tables(
        self, tables: RuleTables, generation: int | None = None, keep: bool = False
    ) -> int:
        """Switch the classifier to a whole new set of tables; returns the new generation
        (`keep`: the same generation as now when `generation` is it: a restart that rewrites
        what the pinned maps already enforce). On failure the live bank is untouched."""
        with self.lock:
            self.settle()
            gen, bank = self.active()
            nb = bank ^ 1
            new_gen = self._new_generation(gen, generation, keep)
            self._check_shapes(tables)
            if tables.staged_all != self._config.staged_all:
                raise DatapathError(
                    "the tables were compiled with staged_all="
                    f"{tables.staged_all}, this classifier runs with staged_all="
                    f"{self._config.staged_all} (compile_policy(..., staged_all=...))"
                )
            fresh = self._take_slots(tables.rule_ids)
            try:
                self._clear_bank(nb, self.tables)
                self._zero_slots(fresh)
                self._fill(nb, new_gen, tables)
            except BaseException:
                self._dirty.add(nb)
                self._give_back(fresh)
                raise
            self._flip(new_gen, nb)
            old, self.tables = self.tables, tables
            gone = [slot for rid, slot in self.slots.items() if rid not in tables.rule_ids]
            for rid in [r for r in self.slots if r not in tables.rule_ids]:
                del self.slots[rid]
            self._start_catch_up(_CatchUp(bank, new_gen, None, tables, old, gone))
            return new_gen

    def apply_change(self, change: TableChange, generation: int | None = None) -> int:
        """Switch the classifier to the live tables with `change` made: its writes into the
        idle bank, the flip, then `change.commit()`; returns the new generation. On failure
        the live bank and the tables are untouched."""
        if self.tables is None:
            raise DatapathError("no tables to change: apply a whole set first")
        delta = change.finish()
        with self.lock:
            self.settle()
            gen, bank = self.active()
            nb = bank ^ 1
            new_gen = self._new_generation(gen, generation, False)
            fresh = self._take_slots(delta.new_rules)
            try:
                if nb in self._dirty:
                    self._clear_bank(nb, None)
                    self._fill(nb, gen, self.tables)
                self._zero_slots(fresh)
                self._write_delta(nb, new_gen, delta, self.tables)
            except BaseException:
                self._dirty.add(nb)
                self._give_back(fresh)
                raise
            self._flip(new_gen, nb)
            change.commit()
            gone = [self.slots.pop(rid) for rid in delta.gone_rules if rid in self.slots]
            self._start_catch_up(_CatchUp(bank, new_gen, delta, self.tables, None, gone))
            return new_gen

    def _check_shapes(self, tables: RuleTables) -> None:
        ms = self._config.max_shapes
        for family in (4, 6):
            # More shapes would be written over the other bank's (the live one's) slots.
            n = len(tables.fam[family].order)
            if n > ms or tables.max_shapes != ms:
                raise DatapathError(
                    f"the policy has {n} IPv{family} rule shapes; this classifier holds at"
                    f" most {ms} (compile it with max_shapes={ms})"
                )

    def _take_slots(self, rule_ids: set[int]) -> list[int]:
        """Slots for the rules that have none (taken now, given back on failure)."""
        fresh: list[int] = []
        for rid in rule_ids:
            if rid in self.slots:
                continue
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                slot = self._next_slot
                self._next_slot += 1
            if slot >= self._config.rule_slots:
                self._free_slots.append(slot)
                self._give_back(fresh)
                raise DatapathError("out of per-rule counter slots")
            self.slots[rid] = slot
            fresh.append(slot)
        return fresh

    def _give_back(self, fresh: list[int]) -> None:
        taken = set(fresh)
        for rid in [r for r, s in self.slots.items() if s in taken]:
            del self.slots[rid]
        self._free_slots.extend(fresh)

    def _flip(self, gen: int, bank: int) -> None:
        # From here on the new set is enforced.
        self._maps.write("active", array_key(0), struct.pack("<Q", active_word(gen, bank)))

    # ---- writing a bank --------------------------------------------------------------------

    def _value(self, cache: dict[int, bytes], value: int) -> bytes:
        v = cache.get(value)
        if v is None:
            e = entry_of(value)
            s_slot = self.slots[e.s_rule_id]
            v = cache[value] = RULE_VAL.pack(
                e.score,
                e.rule_id,
                s_slot if e.rule_id == e.s_rule_id else self.slots[e.rule_id] if e.score else 0,
                e.action,
                e.s_score,
                e.s_rule_id,
                s_slot,
                e.s_action,
            )
        return v

    def _fill(self, bank: int, gen: int, tables: RuleTables) -> None:
        """Every entry, shape and filter word of `tables` into `bank`, then its header."""
        ms = self._config.max_shapes
        cache: dict[int, bytes] = {}
        for family in (4, 6):
            keys: list[bytes] = []
            vals: list[bytes] = []
            for ls in tables.fam[family].order:
                pre = _SHAPE_FIELD.pack(bank * ms + ls.sid)
                for k, score in ls.best.items():
                    keys.append(pre + k[2:])
                    vals.append(self._value(cache, score))
            self._maps.update_batch(f"rules{family}", keys, vals)
            self._write_shapes(bank, family, tables.fam[family].rows())
        bloom = tables.bloom
        base = bank * MS_BLOOM_BANK_WORDS
        top = tables.bloom_top
        self._maps.update_batch(
            "blooms",
            [array_key(base + w) for w in range(top)],
            [bytes(bloom[w * 8 : w * 8 + 8]) for w in range(top)],
        )
        self._write_header(
            bank,
            gen,
            tables.enforced_default,
            len(tables.fam[4].order),
            len(tables.fam[6].order),
            tables.staged_default,
        )
        self._dirty.discard(bank)

    def _write_delta(self, bank: int, gen: int, delta: TableDelta, tables: RuleTables) -> None:
        ms = self._config.max_shapes
        cache: dict[int, bytes] = {}
        base = bank * MS_BLOOM_BANK_WORDS
        # Filter words first: a key must never be in a table its filter hides it in.
        if delta.bloom_words:
            items = sorted(delta.bloom_words.items())
            self._maps.update_batch(
                "blooms",
                [array_key(base + w) for w, _ in items],
                [v.to_bytes(8, "little") for _, v in items],
            )
        for family in (4, 6):
            fd = delta.family(family)
            name = f"rules{family}"
            if fd.deletes:
                self._maps.delete_batch(name, [bank_key(k, bank, ms) for k in fd.deletes])
            if fd.upserts:
                keys = [bank_key(k, bank, ms) for k in fd.upserts]
                vals = [self._value(cache, score) for score in fd.upserts.values()]
                self._maps.update_batch(name, keys, vals)
            if fd.shapes is not None:
                self._write_shapes(bank, family, fd.shapes)
        n4, n6 = delta.nshapes
        self._maps.write(
            "banks",
            array_key(bank),
            BANK.pack(gen, n4, n6, delta.default_action, delta.staged_default),
        )

    def _write_shapes(self, bank: int, family: int, rows: list[ShapeRow]) -> None:
        ms = self._config.max_shapes
        fidx = 0 if family == 4 else 1
        bloom_base = bank * MS_BLOOM_BANK_WORDS
        # A change that moves one shape in the probe order rewrites every row after it: the
        # rows themselves mostly stay, so their packing is kept (both banks, a few changes).
        cache = self._packed_shapes
        if len(cache) > 4 * 2 * 2 * ms:
            cache.clear()
        values = []
        for r in rows:
            v = cache.get((r, bank))
            if v is None:
                v = cache[(r, bank)] = pack_shape(
                    r.shape, r.max_score, bloom_base + r.bloom_off, r.bloom_log2, bank * ms + r.sid
                )
            values.append(v)
        self._maps.update_batch(
            "shapes", [array_key((bank * 2 + fidx) * ms + i) for i in range(len(rows))], values
        )

    def _write_header(
        self, bank: int, gen: int, default: int, n4: int, n6: int, staged_default: int = 0
    ) -> None:
        self._maps.write("banks", array_key(bank), BANK.pack(gen, n4, n6, default, staged_default))

    def _clear_bank(self, bank: int, tables: RuleTables | None) -> None:
        """Remove the rule entries of `bank`: those of `tables` when the bank holds exactly
        them, else (dirty, or no tables) every key of its shape range found by a walk."""
        ms = self._config.max_shapes
        for family in (4, 6):
            name = f"rules{family}"
            if tables is not None and bank not in self._dirty:
                keys = [
                    _SHAPE_FIELD.pack(bank * ms + ls.sid) + k[2:]
                    for ls in tables.fam[family].order
                    for k in ls.best
                ]
            else:
                lo, hi = bank * ms, (bank + 1) * ms
                keys = [
                    k
                    for k in self._maps.keys(name, _RULE_KEYS[family].size)
                    if lo <= _SHAPE_FIELD.unpack_from(k)[0] < hi
                ]
            self._maps.delete_batch(name, keys)
        # The header last: a bank without entries announces no shapes.
        self._write_header(bank, 0, 0, 0, 0)

    # ---- the other bank, beside the caller -----------------------------------------------

    def _start_catch_up(self, job: _CatchUp) -> None:
        job.thread = threading.Thread(
            target=self._catch_up, args=(job,), name="microseg-retire", daemon=True
        )
        self._catching_up = job
        job.thread.start()

    def _catch_up(self, job: _CatchUp) -> None:
        """Once no program reads the old bank: make it equal to the live one. What fails is
        kept in `job` for `settle`, never lost with the thread."""
        job.error = None
        try:
            self._maps.quiesce(job.bank)
            if job.delta is not None and job.bank not in self._dirty:
                self._write_delta(job.bank, job.generation, job.delta, job.tables)
            else:
                self._clear_bank(job.bank, job.old)
                self._fill(job.bank, job.generation, job.tables)
            # Level now: what it took is not kept (a whole set's old tables are large).
            job.old = job.delta = None
        except BaseException as e:  # handed to settle, in the thread that waits for it
            self._dirty.add(job.bank)
            job.error = e

    def settle(self) -> None:
        """Wait until the other bank is level with the live one (tests, shutdown, every apply).

        If bringing it level failed, it is tried once more here (cleared and filled whole) and
        the failure logged; if that fails too, DatapathError: the bank stays dirty and the
        next settle tries again."""
        job = self._catching_up
        if job is None:
            return
        if job.thread is not None:
            job.thread.join()
            job.thread = None
        if job.error is not None:
            first = job.error
            job.delta = None
            job.old = None
            self._catch_up(job)
            if job.error is not None:
                raise DatapathError(
                    f"updating the other policy bank ({job.bank}) failed ({first}), and again"
                    f" ({job.error}): it is rewritten whole before its next use"
                ) from job.error
            log.warning(
                "updating the other policy bank (%d) failed (%s); a retry rewrote it",
                job.bank,
                first,
            )
        self._free_slots.extend(job.slots)
        self._catching_up = None

    def close(self) -> None:
        """`settle` before the maps are released; a catch-up that still fails is raised
        and then dropped (its bank stays as it is in the pinned maps, where the next load's
        `adopt` finds it dirty)."""
        with self.lock:
            try:
                self.settle()
            finally:
                self._catching_up = None

    def _zero_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        ncpu = len(self._maps.percpu("rule_stats", 0))
        zero = bytes(RULE_CTR.size * ncpu)
        # A per-CPU value is written for all CPUs at once.
        self._maps.update_batch("rule_stats", [array_key(s) for s in slots], [zero] * len(slots))
