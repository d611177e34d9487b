"""Policy banks: a compiled policy written into the idle bank, the flip, the old bank retired.

In: CompiledPolicy tables (streamer.datapath.compiler) and the loaded maps. Out: the rules,
shapes, bloom filters and bank header of the idle bank, then `active` switched to it in one
8-byte write; per-rule counter slots kept across generations (a rule keeps its counters) and
zeroed before a new rule uses one. The old bank is cleared beside the caller once no program
can still read it (an RCU barrier); a failure there is kept with the keys it left, retried at
the next `settle` (which every apply and close runs) and raised there if it fails again.
On start, `adopt` learns what a previous agent left in the pinned maps.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass

from streamer.datapath.compiler import (
    CompiledPolicy,
    bloom_layout,
    build_bloom,
    pack_rule_key,
    pack_rule_val,
    pack_shape,
)
from streamer.datapath.config import DatapathConfig, DatapathError
from streamer.datapath.layout import (
    BANK,
    MS_BLOOM_BANK_WORDS,
    RULE_CTR,
    RULE_KEY4,
    RULE_KEY6,
    RULE_VAL,
    active_of,
    active_word,
)
from streamer.datapath.maps import KeysLeft, Maps, array_key

log = logging.getLogger(__name__)

_RULE_ID, _SLOT = RULE_VAL.index("rule_id"), RULE_VAL.index("slot")


@dataclass
class _Retirement:
    """An old bank being cleared: the keys the rules maps may still hold (by family), the
    counter slots to free once they are gone, and why the last attempt failed."""

    bank: int
    keys: dict[int, list[bytes]]
    slots: list[int]
    thread: threading.Thread | None = None
    error: BaseException | None = None


class Banks:
    """The two banks of one classifier. `apply` serializes itself (`lock`) and may run in a
    worker thread while readers run elsewhere; `keys` are the rule keys each bank holds."""

    def __init__(self, maps: Maps, config: DatapathConfig) -> None:
        self._maps = maps
        self._config = config
        self.lock = threading.Lock()
        self.slots: dict[int, int] = {}  # rule_id -> per-rule counter slot
        self._free_slots: list[int] = []
        self._next_slot = 1
        self.keys: dict[int, dict[int, list[bytes]]] = {0: {4: [], 6: []}, 1: {4: [], 6: []}}
        self._retiring: _Retirement | None = None

    def adopt(self) -> bool:
        """Learn what a previous agent left in the pinned maps: banks' keys and rule slots.
        Whether they held an applied generation."""
        gen, bank = self.active()
        for family in (4, 6):
            name = f"rules{family}"
            rule_key = RULE_KEY4 if family == 4 else RULE_KEY6
            for key in self._maps.keys(name, rule_key.size):
                shape_id = struct.unpack_from("<H", key, rule_key.offset("shape"))[0]
                kbank = shape_id // self._config.max_shapes
                self.keys[kbank & 1][family].append(key)
                if kbank == bank and gen > 0:
                    val = self._maps.lookup(name, key, RULE_VAL.size)
                    if val is not None:
                        v = RULE_VAL.unpack(val)
                        self.slots[v[_RULE_ID]] = v[_SLOT]
        used = set(self.slots.values())
        self._next_slot = max(used, default=0) + 1
        if gen > 0:
            log.info("adopted pinned state: generation %d, %d rules", gen, len(self.slots))
        return gen > 0

    def active(self) -> tuple[int, int]:
        """(generation, bank) in force; generation 0 means no policy was ever applied."""
        raw = self._maps.lookup("active", array_key(0), 8)
        return active_of(struct.unpack("<Q", raw)[0] if raw else 0)

    def rule_entries(self, family: int) -> int:
        """Entries of the family's rules map: both banks', and what a failed retire left."""
        n = sum(len(self.keys[b][family]) for b in (0, 1))
        job = self._retiring
        if job is not None and job.error is not None:
            n += len(job.keys[family])
        return n

    def apply(self, compiled: CompiledPolicy, generation: int | None = None) -> int:
        """Switch the classifier to `compiled` in one step; returns the new generation.

        The idle bank is filled while the live one keeps judging; then `active` flips in one
        8-byte write. Old entries are removed only after every program that could still be
        reading them has finished. On failure the live bank is untouched.
        """
        with self.lock:
            self.settle()
            gen, bank = self.active()
            new_bank = bank ^ 1
            new_gen = generation if generation is not None else gen + 1
            if new_gen <= gen:
                new_gen = gen + 1
            ms = self._config.max_shapes
            for family in (4, 6):
                # More shapes would be written over the other bank's (the live one's) slots.
                n = len(compiled.family(family).shapes)
                if n > ms:
                    raise DatapathError(
                        f"the policy has {n} IPv{family} rule shapes; this classifier holds at"
                        f" most {ms} (compile it with max_shapes={ms})"
                    )
            # 1. clear leftovers in the idle bank
            for family in (4, 6):
                try:
                    self._maps.delete_batch(f"rules{family}", self.keys[new_bank][family])
                except KeysLeft as e:
                    self.keys[new_bank][family] = e.keys
                    raise
                self.keys[new_bank][family] = []
            # 2. slots for rules new to the set, counters zeroed before first use
            new_slots: dict[int, int] = {}
            fresh: list[int] = []
            for rid in compiled.rule_ids:
                slot = self.slots.get(rid)
                if slot is None:
                    if self._free_slots:
                        slot = self._free_slots.pop()
                    else:
                        slot = self._next_slot
                        self._next_slot += 1
                    if slot >= self._config.rule_slots:
                        self._free_slots.extend(fresh)  # give back what this call took
                        raise DatapathError("out of per-rule counter slots")
                    fresh.append(slot)
                new_slots[rid] = slot
            try:
                self._zero_slots(fresh)
                self._fill(compiled, new_bank, new_gen, new_slots)
            except Exception:
                for s in fresh:
                    self._free_slots.append(s)
                raise
            # 4. the switch: from here on the new set is enforced
            word = active_word(new_gen, new_bank)
            self._maps.write("active", array_key(0), struct.pack("<Q", word))
            # 5. retire the old bank and the slots of rules that are gone, once no program can
            # still be reading them. Waiting for that (an RCU grace period) takes milliseconds,
            # so it runs beside the caller; the next apply waits for it before reusing the bank.
            job = _Retirement(
                bank,
                self.keys[bank],
                [slot for rid, slot in self.slots.items() if rid not in new_slots],
            )
            self.keys[bank] = {4: [], 6: []}
            self.slots = new_slots
            job.thread = threading.Thread(
                target=self._clear, args=(job,), name="microseg-retire", daemon=True
            )
            self._retiring = job
            job.thread.start()
            return new_gen

    def _fill(
        self, compiled: CompiledPolicy, new_bank: int, new_gen: int, slots: dict[int, int]
    ) -> None:
        """3. rules, shapes and the shapes' filters of the new bank, then its header."""
        ms = self._config.max_shapes
        layout = bloom_layout([len(e) for f in (4, 6) for e in compiled.family(f).entries])
        shape_keys: list[bytes] = []
        shape_vals: list[bytes] = []
        bloom_keys: list[bytes] = []
        bloom_vals: list[bytes] = []
        bloom_base = new_bank * MS_BLOOM_BANK_WORDS
        n = 0
        for family, fidx in ((4, 0), (6, 1)):
            tables = compiled.family(family)
            keys: list[bytes] = []
            vals: list[bytes] = []
            for i, (shape, mx, entries) in enumerate(
                zip(tables.shapes, tables.max_scores, tables.entries, strict=True)
            ):
                sid = new_bank * ms + i
                first = len(keys)
                for k, e in entries.items():
                    keys.append(pack_rule_key(family, sid, k))
                    vals.append(pack_rule_val(e, slots[e.rule_id]))
                off, log2_bits = layout[n]
                n += 1
                if log2_bits:
                    words = build_bloom(family, keys[first:], log2_bits)
                    for w in range(len(words) // 8):
                        bloom_keys.append(array_key(bloom_base + off + w))
                        bloom_vals.append(words[8 * w : 8 * w + 8])
                shape_keys.append(array_key((new_bank * 2 + fidx) * ms + i))
                shape_vals.append(pack_shape(shape, mx, bloom_base + off, log2_bits))
            self.keys[new_bank][family] = keys
            self._maps.update_batch(f"rules{family}", keys, vals)
        self._maps.update_batch("blooms", bloom_keys, bloom_vals)
        self._maps.update_batch("shapes", shape_keys, shape_vals)
        self._maps.write(
            "banks",
            array_key(new_bank),
            BANK.pack(
                new_gen,
                len(compiled.v4.shapes),
                len(compiled.v6.shapes),
                compiled.default_action,
            ),
        )

    def _clear(self, job: _Retirement) -> None:
        """Remove a retired bank's keys once no program can read them; what fails is kept in
        `job` (its error, the keys left) for `settle`, never lost with the thread."""
        job.error = None
        try:
            self._maps.barrier()
            for family in (4, 6):
                try:
                    self._maps.delete_batch(f"rules{family}", job.keys[family])
                except KeysLeft as e:
                    job.keys[family] = e.keys
                    job.error = e
                else:
                    job.keys[family] = []
        except BaseException as e:  # handed to settle, in the thread that waits for it
            job.error = e

    def settle(self) -> None:
        """Wait until the bank retired by the last apply is cleared (tests, shutdown).

        If clearing it failed, it is tried once more here and the failure logged; if that
        fails too, DatapathError: the keys stay known and the next settle tries again."""
        job = self._retiring
        if job is None:
            return
        if job.thread is not None:
            job.thread.join()
            job.thread = None
        if job.error is not None:
            first = job.error
            self._clear(job)
            if job.error is not None:
                left = sum(len(k) for k in job.keys.values())
                raise DatapathError(
                    f"clearing the retired policy bank {job.bank} failed ({first}), and again"
                    f" ({job.error}): {left} of its rule entries are left"
                ) from job.error
            log.warning(
                "clearing the retired policy bank %d failed (%s); a retry cleared it",
                job.bank,
                first,
            )
        self._free_slots.extend(job.slots)
        self._retiring = None

    def close(self) -> None:
        """`settle` before the maps are released; a retirement that still fails is raised
        and then dropped (its keys stay in the pinned maps, where the next load's `adopt`
        finds them and the next apply to that bank clears them)."""
        with self.lock:
            try:
                self.settle()
            finally:
                self._retiring = None

    def _zero_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        ncpu = len(self._maps.percpu("rule_stats", 0))
        zero = bytes(RULE_CTR.size * ncpu)
        # A per-CPU value is written for all CPUs at once.
        self._maps.update_batch("rule_stats", [array_key(s) for s in slots], [zero] * len(slots))
