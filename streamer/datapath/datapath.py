"""The datapath: the only module that talks to bcc and the kernel's BPF and TC objects.

In: a DatapathConfig (which instance, table sizes, idle timeouts) and compiled policies. Out:
programs attached at the TC ingress and egress hooks (tcx links, or clsact filters on kernels
without tcx), a policy bank switched atomically per apply,
counters, sessions (with their TCP state), per-rule hits, a ring buffer of flow events, and
BPF_PROG_TEST_RUN for crafted packets. Under load: `reap_expired` (call it periodically: it
removes sessions past their idle timeout and stale first fragments), `pressure`, `map_fill`,
`session_gauges` and `drops_by_reason` (exact gauges from counters; no walk of the session
table).

Maps (and tcx links) are pinned under <pin_root>/<instance>/ so enforcement outlives the agent:
programs stay attached when the process dies, and the next start adopts the same maps (sessions,
rules, counters) and swaps its programs in atomically (a link update, or `tc filter replace`).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import functools
import importlib.resources
import ipaddress
import json
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from streamer.datapath.compiler import (
    CompiledPolicy,
    bloom_layout,
    build_bloom,
    pack_rule_key,
    pack_rule_val,
    pack_shape,
)
from streamer.datapath.layout import (
    BANK,
    C_MAX,
    COUNTER_NAMES,
    COUNTERS,
    DIRECTION_NAMES,
    FRAG_KEY,
    FRAG_VAL,
    MS_BLOOM_BANK_WORDS,
    MS_LAYOUT_VERSION,
    MS_TCP_SYN_RECV,
    MS_TCP_SYN_SENT,
    MS_TCP_TIME_WAIT,
    MS_TO_FRAGMENT,
    MS_TO_MAX,
    REAPED,
    RULE_CTR,
    RULE_KEY4,
    RULE_KEY6,
    RULE_VAL,
    SESS_KEY,
    SESS_VAL,
    SETTINGS,
    TCP_STATE_NAMES,
    VERDICT_NAMES,
    active_of,
    active_word,
    dir_verdict_counter,
)
from streamer.datapath.reference import Timeouts

log = logging.getLogger(__name__)
T = TypeVar("T")

# The classifier's C source, package data (in a checkout a link to the repository's bpf/).
# A real directory: bcc takes it as -I, which an installed package's files on disk give.
BPF_DIR = Path(str(importlib.resources.files("streamer.datapath") / "bpf"))
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/microseg")
DEFAULT_RUN_DIR = Path("/run/microseg")

TC_PRIO = 0x4D53  # "MS": our filters' preference and handle on every hook
TC_HANDLE = 0x4D53
PARENT_INGRESS = "ffff:fff2"
PARENT_EGRESS = "ffff:fff3"
BPF_TCX_INGRESS = 46  # enum bpf_attach_type
BPF_TCX_EGRESS = 47
ATTACH_MODES = ("auto", "tcx", "tc")
LINKS_DIR = "links"  # <instance>/links/: our pinned tcx links, beside the maps' layout dirs
# hook, program, tcx attach type
HOOKS = (("ingress", "ms_ingress", BPF_TCX_INGRESS), ("egress", "ms_egress", BPF_TCX_EGRESS))
_CLONE_NEWNET = 0x40000000

CLOCK_MONOTONIC_COARSE = 6  # bpf_ktime_get_coarse_ns() reads this clock
_LAST_SEEN_OFF = SESS_VAL.offset("last_seen")
_TCP_STATE_OFF = SESS_VAL.offset("tcp_state")
_TCLASS_OFF = SESS_VAL.offset("tclass")
# positions in SESS_VAL.unpack()'s tuple
_SV_LAST_SEEN, _SV_GEN, _SV_RULE_ID = (SESS_VAL.index(f) for f in ("last_seen", "gen", "rule_id"))
_SV_VERDICT, _SV_ORIG_DIR, _SV_A_IS_SRC, _SV_TCP_STATE, _SV_TCP_FLAGS = (
    SESS_VAL.index(f) for f in ("verdict", "orig_dir", "a_is_src", "tcp_state", "tcp_flags")
)
_SV_PKTS_ORIG, _SV_BYTES_ORIG, _SV_FIRST_SEEN, _SV_PKTS_REPLY, _SV_BYTES_REPLY = (
    SESS_VAL.index(f)
    for f in ("pkts_orig", "bytes_orig", "first_seen", "pkts_reply", "bytes_reply")
)


class DatapathError(RuntimeError):
    """Loading, attaching or updating the classifier failed; the message says what and where."""


@dataclass(frozen=True)
class DatapathConfig:
    """Sizes and identity of one classifier instance (one pin directory)."""

    instance: str
    pin_root: Path = DEFAULT_PIN_ROOT
    session_entries: int = 262144
    max_shapes: int = 512  # the verifier walks the probe loop: 1,024 exceeds its budget
    rule_entries: int = 1 << 22
    rule_slots: int = 200_002  # two whole sets of 100,000 rules side by side, plus slot 0
    ringbuf_pages: int = 256
    event_interval_ns: int = 1_000_000_000
    frag_entries: int = 16384  # remembered first fragments (an LRU)
    timeouts: Timeouts = field(default_factory=Timeouts)  # idle timeouts per protocol and TCP state
    # "tcx": BPF links on the TC hook (kernel 6.6+; no qdisc, and the cheaper hook), "tc":
    # direct-action filters on a clsact qdisc, "auto": tcx where the kernel has it
    attach_mode: str = "auto"

    run_dir: Path = DEFAULT_RUN_DIR

    @property
    def instance_dir(self) -> Path:
        return self.pin_root / self.instance

    @property
    def pin_dir(self) -> Path:
        """Maps of one layout: a restart with other sizes gets fresh maps, never misread ones."""
        return self.instance_dir / (
            f"v{MS_LAYOUT_VERSION}-s{self.session_entries}-p{self.max_shapes}"
            f"-r{self.rule_entries}-c{self.rule_slots}-f{self.frag_entries}"
        )

    @property
    def attachments_file(self) -> Path:
        """Which interfaces we attached to (bpffs holds no plain files, so it lives in /run)."""
        return self.run_dir / self.instance / "attachments.json"


@dataclass(frozen=True)
class Session:
    """One session table entry, oriented as the flow's first packet went."""

    ifindex: int
    family: int
    protocol: int
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    direction: str
    verdict: str
    rule_id: int | None
    generation: int
    first_seen_ns: int
    last_seen_ns: int
    packets_out: int  # from the originator
    bytes_out: int
    packets_in: int  # replies
    bytes_in: int
    tcp_flags: int
    tcp_state: str = ""  # streamer.datapath.layout.TCP_STATE_NAMES ("" for other protocols)


@dataclass(frozen=True)
class MapFill:
    """How full one map is. `evictions`: entries the kernel dropped to make room (LRU maps)."""

    entries: int
    capacity: int
    evictions: int = 0

    @property
    def ratio(self) -> float:
        return self.entries / self.capacity if self.capacity else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "entries": self.entries,
            "capacity": self.capacity,
            "ratio": round(self.ratio, 6),
            "evictions": self.evictions,
        }


# Why packets are dropped, and the counter of each (streamer.api.metrics reports them too).
DROP_REASONS = {
    "policy": "denied_packets",  # deny verdicts
    "parse": "parse_drops",  # unjudgeable headers
    "fragment": "fragment_drops",  # no first, overlapping, tiny
    "pressure": "pressure_drops",  # a map or program failed
}


def drops_by_reason(counters: dict[str, int]) -> dict[str, int]:
    """Dropped packets by reason, from a reading of `Datapath.counters()`."""
    return {reason: int(counters.get(name, 0)) for reason, name in DROP_REASONS.items()}


_PROTO_OFF = SESS_KEY.offset("proto")
_HALF_OPEN = (MS_TCP_SYN_SENT, MS_TCP_SYN_RECV)
_FV_FIRST_SEEN = FRAG_VAL.index("first_seen")


def proto_is_tcp(sess_key: bytes) -> bool:
    """Whether a raw struct ms_sess_key is a TCP flow's."""
    return sess_key[_PROTO_OFF] == 6


def _expired(val: bytes, timeouts_ns: list[int], now: int) -> bool:
    last: int = struct.unpack_from("<Q", val, _LAST_SEEN_OFF)[0]
    return now > last and now - last > timeouts_ns[val[_TCLASS_OFF] & (MS_TO_MAX - 1)]


@dataclass(frozen=True)
class RuleCounters:
    packets: int
    bytes: int
    last_hit_ns: int  # CLOCK_MONOTONIC (coarse); 0: never


class _TestRunOpts(ct.Structure):
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


def _libbpf() -> ct.CDLL:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(_TestRunOpts)]
    lib.bpf_map_update_batch.argtypes = [
        ct.c_int,
        ct.c_void_p,
        ct.c_void_p,
        ct.POINTER(ct.c_uint32),
        ct.c_void_p,
    ]
    lib.bpf_map_delete_batch.argtypes = [
        ct.c_int,
        ct.c_void_p,
        ct.POINTER(ct.c_uint32),
        ct.c_void_p,
    ]
    lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_lookup_batch.argtypes = [
        ct.c_int,
        ct.c_void_p,
        ct.c_void_p,
        ct.c_void_p,
        ct.c_void_p,
        ct.POINTER(ct.c_uint32),
        ct.c_void_p,
    ]
    lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
    lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    lib.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
    lib.bpf_link_detach.argtypes = [ct.c_int]
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_prog_query.argtypes = [
        ct.c_int,
        ct.c_int,
        ct.c_uint32,
        ct.POINTER(ct.c_uint32),
        ct.POINTER(ct.c_uint32),
        ct.POINTER(ct.c_uint32),
    ]
    return lib


_LIB: ct.CDLL | None = None


def libbpf() -> ct.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _libbpf()
    return _LIB


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when it is not (pins need it)."""
    with open("/proc/mounts") as f:
        if any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f):
            return
    os.makedirs("/sys/fs/bpf", exist_ok=True)
    rc = os.system("mount -t bpf bpf /sys/fs/bpf")
    if rc != 0:
        raise DatapathError("/sys/fs/bpf is not a bpf filesystem and mounting one failed")


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for p in sorted(path.rglob("*"), key=lambda x: len(x.parts), reverse=True):
        if p.is_dir():
            p.rmdir()
        else:
            p.unlink()
    path.rmdir()


def _addr(family: int, raw: bytes) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


class Datapath:
    """One loaded classifier instance. `apply` serializes itself (a lock) and may run in a worker
    thread while readers (counters, sessions) run on the loop; the old bank is retired beside it."""

    def __init__(self, config: DatapathConfig) -> None:
        self.config = config
        self._bpf: Any = None
        self._progs: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        self._slots: dict[int, int] = {}  # rule_id -> per-rule counter slot
        self._free_slots: list[int] = []
        self._next_slot = 1
        self._bank_keys: dict[int, dict[int, list[bytes]]] = {0: {4: [], 6: []}, 1: {4: [], 6: []}}
        self._lock = threading.Lock()
        self.adopted = False  # the pinned maps held an applied generation when we loaded
        self.attached_as: dict[str, str] = {}  # interface -> "tcx" or "tc", as attach chose
        self._retiring: threading.Thread | None = None
        self._timeouts = config.timeouts
        # struct ms_reaped, as last written: userspace removals (the kernel never writes it)
        self._reaped: list[int] = [0] * 8
        self._reap_lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Compile and load the classifier, adopting pinned maps of a compatible layout."""
        from bcc import BPF  # the only bcc import of the product

        ensure_bpffs()
        pin = self.config.pin_dir
        if self.config.instance_dir.exists():
            for other in self.config.instance_dir.iterdir():
                if other != pin and other.name != LINKS_DIR:
                    log.warning("pinned maps of another layout in %s: removing them", other)
                    _remove_tree(other)
        pin.mkdir(parents=True, exist_ok=True)
        cflags = [
            f"-I{BPF_DIR}",
            f'-DMS_PIN="{pin}"',
            f"-DMS_MAX_SHAPES={self.config.max_shapes}",
            f"-DMS_SESSIONS={self.config.session_entries}",
            f"-DMS_RULE_ENTRIES={self.config.rule_entries}",
            f"-DMS_RULE_SLOTS={self.config.rule_slots}",
            f"-DMS_RINGBUF_PAGES={self.config.ringbuf_pages}",
            f"-DMS_FRAGS={self.config.frag_entries}",
            "-Wno-unused-function",
        ]
        try:
            self._bpf = BPF(src_file=str(BPF_DIR / "classifier.c"), cflags=cflags)
            for name in ("ms_ingress", "ms_egress", "ms_judge", "ms_related", "ms_record"):
                self._progs[name] = self._bpf.load_func(name, BPF.SCHED_CLS)
        except Exception as e:  # bcc raises bare Exception
            raise DatapathError(f"loading the classifier failed: {e}") from e
        self._bpf["slow_path"][ct.c_int(0)] = ct.c_int(self._progs["ms_judge"].fd)
        self._bpf["slow_path"][ct.c_int(1)] = ct.c_int(self._progs["ms_related"].fd)
        self._bpf["slow_path"][ct.c_int(2)] = ct.c_int(self._progs["ms_record"].fd)
        self._bpf["barrier"][ct.c_int(0)] = ct.c_int(self._bpf["barrier_inner"].get_fd())
        for name in (
            "sessions",
            "rules4",
            "rules6",
            "shapes",
            "banks",
            "active",
            "settings",
            "counters",
            "rule_stats",
            "blooms",
            "frags",
            "reaped",
        ):
            self._fds[name] = self._bpf[name].get_fd()
        self.set_timeouts(self.config.timeouts)
        raw = self._lookup(self._fds["reaped"], struct.pack("<I", 0), REAPED.size)
        self._reaped = list(REAPED.unpack(raw)) if raw else [0] * len(self._reaped)
        self._adopt()

    def _adopt(self) -> None:
        """Learn what a previous agent left in the pinned maps: banks' keys and rule slots."""
        gen, bank = self.active()
        for family in (4, 6):
            fd = self._fds[f"rules{family}"]
            rule_key = RULE_KEY4 if family == 4 else RULE_KEY6
            for key in self._iter_keys(fd, rule_key.size):
                shape_id = struct.unpack_from("<H", key, rule_key.offset("shape"))[0]
                kbank = shape_id // self.config.max_shapes
                self._bank_keys[kbank & 1][family].append(key)
                if kbank == bank and gen > 0:
                    val = self._lookup(fd, key, RULE_VAL.size)
                    if val is not None:
                        v = RULE_VAL.unpack(val)
                        self._slots[v[RULE_VAL.index("rule_id")]] = v[RULE_VAL.index("slot")]
        used = set(self._slots.values())
        self._next_slot = max(used, default=0) + 1
        if gen > 0:
            self.adopted = True
            log.info("adopted pinned state: generation %d, %d rules", gen, len(self._slots))

    @property
    def loaded(self) -> bool:
        return self._bpf is not None

    def close(self) -> None:
        """Release our references; pinned maps and attached filters stay."""
        with self._lock:
            self.settle()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def remove_pins(self) -> None:
        """Delete this instance's pin directory (after detaching everywhere)."""
        _remove_tree(self.config.instance_dir)

    # ---- raw map access --------------------------------------------------------------------

    def _write(self, name: str, key: bytes, value: bytes) -> None:
        lib = libbpf()
        if lib.bpf_map_update_elem(self._fds[name], key, value, 0) != 0:
            err = ct.get_errno()
            raise DatapathError(f"writing map {name} failed: {os.strerror(err)}")

    def _lookup(self, fd: int, key: bytes, vsize: int) -> bytes | None:
        buf = ct.create_string_buffer(vsize)
        if libbpf().bpf_map_lookup_elem(fd, key, buf) != 0:
            return None
        return buf.raw

    def _iter_keys(self, fd: int, ksize: int) -> Iterator[bytes]:
        lib = libbpf()
        prev: bytes | None = None
        nxt = ct.create_string_buffer(ksize)
        while lib.bpf_map_get_next_key(fd, prev, nxt) == 0:
            prev = nxt.raw
            yield prev

    def _update_batch(self, name: str, keys: list[bytes], values: list[bytes]) -> None:
        if not keys:
            return
        lib = libbpf()
        fd = self._fds[name]
        step = 65536
        for i in range(0, len(keys), step):
            kb = b"".join(keys[i : i + step])
            vb = b"".join(values[i : i + step])
            count = ct.c_uint32(len(keys[i : i + step]))
            if lib.bpf_map_update_batch(fd, kb, vb, ct.byref(count), None) != 0:
                err = ct.get_errno()
                raise DatapathError(
                    f"writing {len(keys)} entries to map {name} failed after {i + count.value}:"
                    f" {os.strerror(err)}"
                )

    def _delete_batch(self, name: str, keys: list[bytes]) -> None:
        lib = libbpf()
        fd = self._fds[name]
        step = 65536
        for i in range(0, len(keys), step):
            chunk = keys[i : i + step]
            count = ct.c_uint32(len(chunk))
            if lib.bpf_map_delete_batch(fd, b"".join(chunk), ct.byref(count), None) != 0:
                # Some keys were already gone: fall back to one by one, ignoring misses.
                for k in chunk:
                    lib.bpf_map_delete_elem(fd, k)

    def _percpu(self, name: str, index: int) -> list[bytes]:
        """One per-CPU array entry, as raw bytes per possible CPU."""
        table = self._bpf[name]
        vals = table[ct.c_uint32(index)]
        return [bytes(v) for v in vals]

    def _barrier(self) -> None:
        """Return once no BPF program still runs with a view from before this call."""
        self._bpf["barrier"][ct.c_int(0)] = ct.c_int(self._bpf["barrier_inner"].get_fd())

    # ---- policy ------------------------------------------------------------------------------

    def active(self) -> tuple[int, int]:
        """(generation, bank) in force; generation 0 means no policy was ever applied."""
        raw = self._lookup(self._fds["active"], struct.pack("<I", 0), 8)
        return active_of(struct.unpack("<Q", raw)[0] if raw else 0)

    def apply(self, compiled: CompiledPolicy, generation: int | None = None) -> int:
        """Switch the classifier to `compiled` in one step; returns the new generation.

        The idle bank is filled while the live one keeps judging; then `active` flips in one
        8-byte write. Old entries are removed only after every program that could still be
        reading them has finished. On failure the live bank is untouched.
        """
        with self._lock:
            self.settle()
            gen, bank = self.active()
            new_bank = bank ^ 1
            new_gen = generation if generation is not None else gen + 1
            if new_gen <= gen:
                new_gen = gen + 1
            ms = self.config.max_shapes
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
                self._delete_batch(f"rules{family}", self._bank_keys[new_bank][family])
                self._bank_keys[new_bank][family] = []
            # 2. slots for rules new to the set, counters zeroed before first use
            new_slots: dict[int, int] = {}
            fresh: list[int] = []
            for rid in compiled.rule_ids:
                slot = self._slots.get(rid)
                if slot is None:
                    if self._free_slots:
                        slot = self._free_slots.pop()
                    else:
                        slot = self._next_slot
                        self._next_slot += 1
                    if slot >= self.config.rule_slots:
                        self._free_slots.extend(fresh)  # give back what this call took
                        raise DatapathError("out of per-rule counter slots")
                    fresh.append(slot)
                new_slots[rid] = slot
            try:
                self._zero_slots(fresh)
                # 3. rules, shapes and the shapes' filters of the new bank
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
                            vals.append(pack_rule_val(e, new_slots[e.rule_id]))
                        off, log2_bits = layout[n]
                        n += 1
                        if log2_bits:
                            words = build_bloom(family, keys[first:], log2_bits)
                            for w in range(len(words) // 8):
                                bloom_keys.append(struct.pack("<I", bloom_base + off + w))
                                bloom_vals.append(words[8 * w : 8 * w + 8])
                        shape_keys.append(struct.pack("<I", (new_bank * 2 + fidx) * ms + i))
                        shape_vals.append(pack_shape(shape, mx, bloom_base + off, log2_bits))
                    self._bank_keys[new_bank][family] = keys
                    self._update_batch(f"rules{family}", keys, vals)
                self._update_batch("blooms", bloom_keys, bloom_vals)
                self._update_batch("shapes", shape_keys, shape_vals)
                self._write(
                    "banks",
                    struct.pack("<I", new_bank),
                    BANK.pack(
                        new_gen,
                        len(compiled.v4.shapes),
                        len(compiled.v6.shapes),
                        compiled.default_action,
                    ),
                )
            except Exception:
                for s in fresh:
                    self._free_slots.append(s)
                raise
            # 4. the switch: from here on the new set is enforced
            word = active_word(new_gen, new_bank)
            self._write("active", struct.pack("<I", 0), struct.pack("<Q", word))
            # 5. retire the old bank and the slots of rules that are gone, once no program can
            # still be reading them. Waiting for that (an RCU grace period) takes milliseconds,
            # so it runs beside the caller; the next apply waits for it before reusing the bank.
            old_keys = self._bank_keys[bank]
            self._bank_keys[bank] = {4: [], 6: []}
            gone = [slot for rid, slot in self._slots.items() if rid not in new_slots]
            self._slots = new_slots
            self._retiring = threading.Thread(
                target=self._retire, args=(old_keys, gone), name="microseg-retire", daemon=True
            )
            self._retiring.start()
            return new_gen

    def _retire(self, keys: dict[int, list[bytes]], slots: list[int]) -> None:
        self._barrier()
        for family in (4, 6):
            self._delete_batch(f"rules{family}", keys[family])
        self._free_slots.extend(slots)

    def settle(self) -> None:
        """Wait until the bank retired by the last apply is cleared (tests, shutdown)."""
        if self._retiring is not None:
            self._retiring.join()
            self._retiring = None

    def _zero_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        ncpu = len(self._percpu("rule_stats", 0))
        zero = bytes(RULE_CTR.size * ncpu)
        # A per-CPU value is written for all CPUs at once.
        self._update_batch("rule_stats", [struct.pack("<I", s) for s in slots], [zero] * len(slots))

    # ---- reading -----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Global counters summed over CPUs, packets by direction and verdict, and the session
        gauges derived from them (see `session_gauges`)."""
        per_cpu = self._percpu("counters", 0)
        sums = [0] * C_MAX
        for raw in per_cpu:
            for i, v in enumerate(COUNTERS.unpack(raw[: COUNTERS.size])):
                sums[i] += v
        out = {name: sums[i] for name, i in COUNTER_NAMES.items()}
        for d, dname in DIRECTION_NAMES.items():
            for v, vname in VERDICT_NAMES.items():
                out[f"{dname}_{vname}_packets"] = sums[dir_verdict_counter(d, v)]
        out.update(self._gauges(out))
        return out

    def _gauges(self, c: dict[str, int]) -> dict[str, int]:
        expired_reaped, closed_reaped, half_reaped, cleared, frags_reaped = self._reaped[:5]
        removed = c["renewed_expired"] + c["renewed_closed"]
        removed += expired_reaped + closed_reaped + cleared
        return {
            "active_sessions": max(0, c["new_sessions"] - removed),
            "half_open_sessions": max(0, c["half_open_opened"] - c["half_open_left"] - half_reaped),
            "expired_sessions": c["renewed_expired"] + expired_reaped,
            "closed_sessions_removed": c["renewed_closed"] + closed_reaped,
            "cleared_sessions": cleared,
            "fragments_expired": frags_reaped,
            "policy_drops": c["denied_packets"],
        }

    def session_gauges(self) -> dict[str, int]:
        """Exact session-table gauges, cheap (no walk): `active_sessions` (entries in the table:
        inserted minus renewed, reaped and cleared), `half_open_sessions` (SYN_SENT/SYN_RECV),
        `expired_sessions`, `closed_sessions_removed`, `cleared_sessions`."""
        c = self.counters()
        return {k: c[k] for k in self._gauges(c)}

    def drops_by_reason(self) -> dict[str, int]:
        """Dropped packets by reason (see the module function)."""
        return drops_by_reason(self.counters())

    def rule_counters(self, rule_id: int) -> RuleCounters:
        """Hits of one rule (packets and bytes of the flows it decided), or zeros if unknown."""
        slot = self._slots.get(rule_id)
        if slot is None:
            return RuleCounters(0, 0, 0)
        return self._slot_counters(slot)

    def default_counters(self) -> RuleCounters:
        """Packets and bytes decided by the default action."""
        return self._slot_counters(0)

    def _slot_counters(self, slot: int) -> RuleCounters:
        p = b = last = 0
        for raw in self._percpu("rule_stats", slot):
            cp, cb, cl = RULE_CTR.unpack(raw[: RULE_CTR.size])
            p += cp
            b += cb
            last = max(last, cl)
        return RuleCounters(p, b, last)

    def all_rule_counters(self) -> dict[int, RuleCounters]:
        return {rid: self._slot_counters(slot) for rid, slot in self._slots.items()}

    def sessions(self, limit: int | None = None) -> Iterator[Session]:
        """Session table entries (a snapshot walk: entries may come and go meanwhile)."""
        fd = self._fds["sessions"]
        n = 0
        for key in self._iter_keys(fd, SESS_KEY.size):
            raw = self._lookup(fd, key, SESS_VAL.size)
            if raw is None:
                continue
            yield self._session(key, raw)
            n += 1
            if limit is not None and n >= limit:
                return

    def session_count(self) -> int:
        """Entries in the session table: exact, from counters (no walk)."""
        return self.counters()["active_sessions"]

    @staticmethod
    def _session(key: bytes, raw: bytes) -> Session:
        ifindex, family, proto, _, a, b, ap, bp = SESS_KEY.unpack(key)
        v = SESS_VAL.unpack(raw)
        last, gen, rule_id = v[_SV_LAST_SEEN], v[_SV_GEN], v[_SV_RULE_ID]
        verdict, orig_dir, a_is_src = v[_SV_VERDICT], v[_SV_ORIG_DIR], v[_SV_A_IS_SRC]
        tcp_state, tcp_flags = v[_SV_TCP_STATE], v[_SV_TCP_FLAGS]
        p0, b0, first = v[_SV_PKTS_ORIG], v[_SV_BYTES_ORIG], v[_SV_FIRST_SEEN]
        p1, b1 = v[_SV_PKTS_REPLY], v[_SV_BYTES_REPLY]
        aport, bport = int.from_bytes(ap, "big"), int.from_bytes(bp, "big")
        if a_is_src:
            src, dst, sport, dport = a, b, aport, bport
        else:
            src, dst, sport, dport = b, a, bport, aport
        return Session(
            ifindex=ifindex,
            family=family,
            protocol=proto,
            src_ip=_addr(family, src),
            dst_ip=_addr(family, dst),
            src_port=sport,
            dst_port=dport,
            direction=DIRECTION_NAMES.get(orig_dir, "?"),
            verdict=VERDICT_NAMES.get(verdict, "?"),
            rule_id=rule_id or None,
            generation=gen,
            first_seen_ns=first,
            last_seen_ns=last,
            packets_out=p0,
            bytes_out=b0,
            packets_in=p1,
            bytes_in=b1,
            tcp_flags=tcp_flags,
            tcp_state=TCP_STATE_NAMES.get(tcp_state, "?") if proto == 6 else "",
        )

    def clear_sessions(self) -> None:
        """Remove every session (counted as `cleared_sessions`)."""
        fd = self._fds["sessions"]
        lib = libbpf()
        with self._reap_lock:
            cleared = half = 0
            for k in list(self._iter_keys(fd, SESS_KEY.size)):
                raw = self._lookup(fd, k, SESS_VAL.size)
                if lib.bpf_map_delete_elem(fd, k) == 0:
                    cleared += 1
                    if proto_is_tcp(k) and raw is not None and raw[_TCP_STATE_OFF] in _HALF_OPEN:
                        half += 1
            self._count_reaped(cleared=cleared, half_open=half)

    def clear_fragments(self) -> None:
        """Forget every remembered first fragment (counted as `fragments_expired`)."""
        fd = self._fds["frags"]
        with self._reap_lock:
            n = 0
            for k in list(self._iter_keys(fd, FRAG_KEY.size)):
                if libbpf().bpf_map_delete_elem(fd, k) == 0:
                    n += 1
            self._count_reaped(frags=n)

    def _count_reaped(
        self,
        expired: int = 0,
        closed: int = 0,
        half_open: int = 0,
        cleared: int = 0,
        frags: int = 0,
    ) -> None:
        if not (expired or closed or half_open or cleared or frags):
            return
        r = self._reaped
        r[0] += expired
        r[1] += closed
        r[2] += half_open
        r[3] += cleared
        r[4] += frags
        self._write("reaped", struct.pack("<I", 0), REAPED.pack(*r))

    # ---- state: timeouts, the reaper, pressure -------------------------------------------

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Idle timeouts the classifier and the reaper use from now on (live sessions too)."""
        self._write(
            "settings",
            struct.pack("<I", 0),
            SETTINGS.pack(self.config.event_interval_ns, *timeouts.by_class_ns()),
        )
        self._timeouts = timeouts

    @staticmethod
    def now_ns() -> int:
        """The classifier's clock (CLOCK_MONOTONIC, coarse), in ns."""
        return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)

    def _walk(self, fd: int, ksize: int, vsize: int) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every entry, in batches of 4,096 (one syscall each); entries may
        come and go meanwhile."""
        lib = libbpf()
        step = 4096
        keys = ct.create_string_buffer(ksize * step)
        vals = ct.create_string_buffer(vsize * step)
        token_in = ct.create_string_buffer(64)
        token_out = ct.create_string_buffer(64)
        first = True
        while True:
            count = ct.c_uint32(step)
            rc = lib.bpf_map_lookup_batch(
                fd, None if first else token_in, token_out, keys, vals, ct.byref(count), None
            )
            err = ct.get_errno() if rc != 0 else 0
            if rc != 0 and err != errno.ENOENT:
                if first and err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):
                    for k in self._iter_keys(fd, ksize):  # kernels without batch ops
                        v = self._lookup(fd, k, vsize)
                        if v is not None:
                            yield k, v
                    return
                raise DatapathError(f"walking a map failed: {os.strerror(err)}")
            kb, vb = keys.raw, vals.raw
            for i in range(count.value):
                yield kb[i * ksize : (i + 1) * ksize], vb[i * vsize : (i + 1) * vsize]
            if rc != 0:  # ENOENT: that was the last batch
                return
            ct.memmove(token_in, token_out, 64)
            first = False

    def reap_expired(self, now_ns: int | None = None) -> dict[str, int]:
        """Remove sessions idle beyond their timeout (finished TCP sessions after their short
        linger) and first fragments older than theirs; returns how many of each went:
        `expired` (open sessions), `closed` (TIME_WAIT/CLOSED), `fragments`.

        Call it periodically (the agent does, every few seconds). Each candidate is read again
        just before it is deleted, so a flow that woke up meanwhile stays; one that wakes in
        the microseconds between that read and the delete is judged as new at its next
        packet. `now_ns` is on `now_ns()`'s clock (tests pass one to look into the future).
        """
        now = self.now_ns() if now_ns is None else now_ns
        to = self._timeouts.by_class_ns()
        lib = libbpf()
        with self._reap_lock:
            fd = self._fds["sessions"]
            candidates = [
                (k, v[_LAST_SEEN_OFF : _LAST_SEEN_OFF + 8])
                for k, v in self._walk(fd, SESS_KEY.size, SESS_VAL.size)
                if _expired(v, to, now)
            ]
            expired = closed = half = 0
            for k, seen in candidates:
                v = self._lookup(fd, k, SESS_VAL.size)
                if v is None or v[_LAST_SEEN_OFF : _LAST_SEEN_OFF + 8] != seen:
                    continue
                if lib.bpf_map_delete_elem(fd, k) != 0:
                    continue
                state = v[_TCP_STATE_OFF] if proto_is_tcp(k) else 0
                if state >= MS_TCP_TIME_WAIT:
                    closed += 1
                else:
                    expired += 1
                if state in _HALF_OPEN:
                    half += 1
            ffd = self._fds["frags"]
            limit = to[MS_TO_FRAGMENT]
            old = [
                k
                for k, v in self._walk(ffd, FRAG_KEY.size, FRAG_VAL.size)
                if now > FRAG_VAL.unpack(v)[_FV_FIRST_SEEN]
                and now - FRAG_VAL.unpack(v)[_FV_FIRST_SEEN] > limit
            ]
            frags = sum(1 for k in old if lib.bpf_map_delete_elem(ffd, k) == 0)
            self._count_reaped(expired=expired, closed=closed, half_open=half, frags=frags)
        return {"expired": expired, "closed": closed, "fragments": frags}

    def map_fill(self, counters: dict[str, int] | None = None) -> dict[str, MapFill]:
        """Entries, capacity and fill ratio of every map that fills up: sessions (exact, no
        walk; never evicts: a full table judges new flows without caching them), fragments
        (an LRU: a walk; `evictions` = remembered firsts that left other than by the reaper),
        rules4/rules6 (both banks), rule_slots (per-rule counters), shapes4/shapes6 (of the
        live bank). `counters`: a `counters()` reading to use instead of taking one."""
        c = self.counters() if counters is None else counters
        cfg = self.config
        out: dict[str, MapFill] = {}
        out["sessions"] = MapFill(c["active_sessions"], cfg.session_entries, 0)
        nfrag = sum(1 for _ in self._walk(self._fds["frags"], FRAG_KEY.size, FRAG_VAL.size))
        gone = c["fragments_first"] - self._reaped[4] - nfrag
        out["fragments"] = MapFill(nfrag, cfg.frag_entries, max(0, gone))
        for fam in (4, 6):
            n = sum(len(self._bank_keys[b][fam]) for b in (0, 1))
            out[f"rules{fam}"] = MapFill(n, cfg.rule_entries, 0)
        out["rule_slots"] = MapFill(len(self._slots) + 1, cfg.rule_slots, 0)
        gen, bank = self.active()
        raw = self._lookup(self._fds["banks"], struct.pack("<I", bank), BANK.size)
        b = BANK.unpack(raw) if raw and gen else None
        n4, n6 = (b[BANK.index("nshapes4")], b[BANK.index("nshapes6")]) if b else (0, 0)
        out["shapes4"] = MapFill(n4, cfg.max_shapes, 0)
        out["shapes6"] = MapFill(n6, cfg.max_shapes, 0)
        return out

    def pressure(self) -> dict[str, Any]:
        """What the operator watches under load, in one read: the session gauges, the
        counters to take rates of (new_sessions, syn_new_sessions), drops by reason and the
        fill of every map (`fill`: name -> {entries, capacity, ratio, evictions})."""
        c = self.counters()
        keys = (
            "active_sessions",
            "half_open_sessions",
            "new_sessions",
            "syn_new_sessions",
            "closed_sessions",
            "expired_sessions",
            "session_create_failed",
            "related_passed",
            "fragments_first",
            "fragments_replaced",
            "fragments_followed",
            "fragment_drops_no_first",
            "fragment_drops_overlap",
            "fragment_drops_tiny",
        )
        out: dict[str, Any] = {k: c[k] for k in keys}
        out["drops"] = drops_by_reason(c)
        out["fill"] = {name: f.to_dict() for name, f in self.map_fill(c).items()}
        return out

    # ---- events ------------------------------------------------------------------------------

    def open_events(self, callback: Callable[[bytes], bool | None]) -> int:
        """Route ring-buffer records (raw struct ms_event bytes, copied) to callback.

        A callback returning False ends the current consume_events() after that record (the
        rest stays in the ring for the next call). Returns the epoll fd to watch; call
        consume_events() when it is readable.
        """

        def _cb(_ctx: Any, data: Any, size: int) -> int:
            more = callback(ct.string_at(data, size))
            return -1 if more is False else 0

        self._bpf["events"].open_ring_buffer(_cb)
        return int(libbpf().ring_buffer__epoll_fd(ct.c_void_p(self._bpf._ringbuf_manager)))

    def consume_events(self) -> None:
        self._bpf.ring_buffer_consume()

    def events_ring(self) -> tuple[int, int]:
        """The ring buffer's map fd and its data size in bytes (a power of two), for a reader
        that maps it itself (streamer.events.source.RingReader) instead of `open_events`."""
        return int(self._bpf["events"].get_fd()), self.config.ringbuf_pages * mmap.PAGESIZE

    # ---- attaching ---------------------------------------------------------------------------

    def attach(self, ifname: str, netns: str | None = None) -> int:
        """Attach (or atomically replace) our programs on the TC ingress and egress hooks of
        ifname: as pinned tcx links, or as filters on a clsact qdisc (`attach_mode`).

        Returns the interface index. An attachment of ours in the other form goes only once
        the new one judges, so no packet passes unjudged. Records the mode and whether it
        created the clsact qdisc, so detach removes only what we added.
        """
        from pyroute2 import IPRoute

        mode = self.config.attach_mode
        if mode not in ATTACH_MODES:
            raise DatapathError(f"attach mode {mode!r}: expected one of {', '.join(ATTACH_MODES)}")
        with IPRoute(netns=netns) if netns else IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                where = f" in netns {netns}" if netns else ""
                raise DatapathError(f"no interface named {ifname}{where}")
            index = int(idx[0])
            created = False
            if mode != "tc":
                try:
                    self._attach_tcx(ifname, netns, index)
                except _NoTcx as e:
                    if mode == "tcx":
                        raise DatapathError(f"{ifname}: the kernel has no tcx hook ({e})") from e
                    mode = "tc"
                else:
                    mode = "tcx"
                    _del_tc_filters(ipr, index)
            if mode == "tc":
                qdiscs = [
                    q for q in ipr.get_qdiscs(index=index) if q.get_attr("TCA_KIND") == "clsact"
                ]
                if not qdiscs:
                    ipr.tc("add", "clsact", index)
                    created = True
                for hook, prog, _ in HOOKS:
                    fn = self._progs[prog]
                    ipr.tc(
                        "replace-filter",
                        "bpf",
                        index,
                        TC_HANDLE,
                        fd=fn.fd,
                        name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
                        parent=PARENT_INGRESS if hook == "ingress" else PARENT_EGRESS,
                        prio=TC_PRIO,
                        classid=1,
                        direct_action=True,
                    )
                _unpin_links(self.config.pin_root, ifname, netns)
        self._record_attachment(ifname, netns, created, mode)
        self.attached_as[ifname] = mode
        return index

    def _attach_tcx(self, ifname: str, netns: str | None, index: int) -> None:
        """Our programs as tcx links pinned under <instance>/links/: a pinned link of ours on
        this interface is updated in place (atomic), a stale one (its interface gone or
        renumbered) replaced. _NoTcx when the kernel has no tcx hook."""
        lib = libbpf()
        for hook, prog, atype in HOOKS:
            path = _link_pin(self.config.instance_dir, ifname, netns, hook)
            prog_fd = int(self._progs[prog].fd)
            if path.exists():
                fd = lib.bpf_obj_get(str(path).encode())
                if fd >= 0:
                    try:
                        same = _link_ifindex(fd) == index
                        if same and lib.bpf_link_update(fd, prog_fd, None) == 0:
                            continue
                        lib.bpf_link_detach(fd)
                    finally:
                        os.close(fd)
                path.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)

            def create(prog_fd: int = prog_fd, atype: int = atype) -> int:
                return int(lib.bpf_link_create(prog_fd, index, atype, None))

            fd = _in_netns(netns, create)
            if fd < 0:
                err = -fd
                if err == errno.EINVAL and hook == "ingress":
                    raise _NoTcx(os.strerror(err))
                raise DatapathError(f"{ifname} {hook}: attaching (tcx) failed: {os.strerror(err)}")
            try:
                if lib.bpf_obj_pin(fd, str(path).encode()) != 0:
                    err = ct.get_errno()
                    lib.bpf_link_detach(fd)
                    raise DatapathError(f"pinning {path} failed: {os.strerror(err)}")
            finally:
                os.close(fd)

    def _record_attachment(
        self, ifname: str, netns: str | None, created_qdisc: bool, mode: str
    ) -> None:
        path = self.config.attachments_file
        path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        key = f"{netns or ''}/{ifname}"
        prev = data.get(key, {})
        data[key] = {
            "created_qdisc": prev.get("created_qdisc", False) or created_qdisc,
            "mode": mode,
        }
        path.write_text(json.dumps(data))


class _NoTcx(Exception):
    """The kernel refused a tcx link for a TC program: it predates tcx (Linux 6.6)."""


def _link_pin(instance_dir: Path, ifname: str, netns: str | None, hook: str) -> Path:
    """Where our tcx link on one hook of one interface is pinned (interface names hold no
    '/'; the namespace part is prefixed so no netns name can pass for the host's)."""
    return instance_dir / LINKS_DIR / (f"ns-{netns}" if netns else "host") / ifname / hook


def _link_ifindex(fd: int) -> int:
    """The interface of a tcx link (struct bpf_link_info: tcx.ifindex at byte 16); 0 when the
    link is defunct or not a tcx link."""
    info = ct.create_string_buffer(64)
    size = ct.c_uint32(len(info))
    if libbpf().bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
        return 0
    return int(struct.unpack_from("<I", info.raw, 16)[0])


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """fn() run in network namespace `netns` (by name, /run/netns), for calls that name an
    interface by index. Runs in a thread of its own: a namespace is a per-thread property,
    and that thread ends with the call."""
    if not netns:
        return fn()
    out: list[T] = []
    errs: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(Path("/run/netns") / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ct.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise DatapathError(f"entering netns {netns}: {os.strerror(ct.get_errno())}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            errs.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if errs:
        if isinstance(errs[0], OSError):
            raise DatapathError(f"netns {netns}: {errs[0]}") from errs[0]
        raise errs[0]
    return out[0]


def _del_tc_filters(ipr: Any, index: int) -> list[str]:
    """Remove our clsact filters (handle and preference 0x4d53) from the interface's hooks."""
    removed = []
    for hook, parent in (("ingress", PARENT_INGRESS), ("egress", PARENT_EGRESS)):
        with contextlib.suppress(Exception):
            ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=parent, prio=TC_PRIO)
            removed.append(hook)
    return removed


def _unpin_links(pin_root: Path, ifname: str, netns: str | None) -> list[str]:
    """Detach and unpin every instance's tcx links of ours on the interface; the hooks whose
    link went."""
    removed = []
    lib = libbpf()
    nsdir = f"ns-{netns}" if netns else "host"
    pins = pin_root.glob(f"*/{LINKS_DIR}/{nsdir}/{ifname}/*") if pin_root.exists() else []
    for path in sorted(pins):
        fd = lib.bpf_obj_get(str(path).encode())
        if fd >= 0:
            lib.bpf_link_detach(fd)
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return removed


def tcx_programs(ifname: str, netns: str | None = None) -> dict[str, list[tuple[int, str]]]:
    """(id, name) of the programs on the interface's tcx ingress and egress hooks, in order
    (anyone's, not only ours; empty where the kernel has no tcx)."""
    from pyroute2 import IPRoute

    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise DatapathError(f"no interface named {ifname}")
    lib = libbpf()
    index = int(idx[0])

    def query(atype: int) -> list[int]:
        ids = (ct.c_uint32 * 64)()
        cnt, flags = ct.c_uint32(64), ct.c_uint32(0)
        if lib.bpf_prog_query(index, atype, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
            return []
        return list(ids[: cnt.value])

    out: dict[str, list[tuple[int, str]]] = {}
    for hook, _, atype in HOOKS:
        out[hook] = []
        for pid in _in_netns(netns, functools.partial(query, atype)):
            fd = lib.bpf_prog_get_fd_by_id(pid)
            name = ""
            if fd >= 0:
                info = ct.create_string_buffer(256)
                size = ct.c_uint32(len(info))
                if lib.bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) == 0:
                    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
                os.close(fd)
            out[hook].append((int(pid), name))
    return out


def detach(
    ifname: str,
    netns: str | None = None,
    run_dir: Path = DEFAULT_RUN_DIR,
    pin_root: Path = DEFAULT_PIN_ROOT,
) -> list[str]:
    """Remove our programs from the interface: tcx links and clsact filters (and the clsact
    qdisc if we created it and nothing else uses it).

    Returns what was removed, for the operator. Other tools' programs are left alone.
    """
    from pyroute2 import IPRoute

    removed: list[str] = []
    created_qdisc = False
    key = f"{netns or ''}/{ifname}"
    records: list[Path] = sorted(run_dir.glob("*/attachments.json")) if run_dir.exists() else []
    for path in records:
        data = json.loads(path.read_text())
        if key in data:
            created_qdisc = created_qdisc or data[key].get("created_qdisc", False)
            del data[key]
            path.write_text(json.dumps(data))
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise DatapathError(f"no interface named {ifname}")
        index = idx[0]
        removed += [f"{ifname} {hook} (tcx)" for hook in _unpin_links(pin_root, ifname, netns)]
        removed += [f"{ifname} {hook}" for hook in _del_tc_filters(ipr, index)]
        if created_qdisc:
            others = [
                f
                for parent in (0xFFFFFFF2, 0xFFFFFFF3)
                for f in ipr.get_filters(index=index, parent=parent)
            ]
            if not others:
                with contextlib.suppress(Exception):
                    ipr.tc("del", "clsact", index)
                    removed.append(f"{ifname} clsact")
    return removed


def test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: (the program's return code, mean ns per run)."""
    buf = ct.create_string_buffer(frame, len(frame))
    out = ct.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts(
        sz=ct.sizeof(_TestRunOpts),
        data_in=ct.cast(buf, ct.c_void_p),
        data_out=ct.cast(out, ct.c_void_p),
        data_size_in=len(frame),
        data_size_out=len(out),
        repeat=max(1, repeat),
    )
    if libbpf().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)) != 0:
        err = ct.get_errno()
        raise DatapathError(f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return int(ct.c_int32(opts.retval).value), int(opts.duration)


def prog_fd(dp: Datapath, direction: str) -> int:
    """The fd of the ingress or egress program, for test_run."""
    return int(dp._progs["ms_ingress" if direction == "ingress" else "ms_egress"].fd)
