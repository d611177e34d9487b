"""The contract between the kernel and Python: what bpf/classifier.h defines, said once.

In: nothing (constants only). Out: the header's `#define MS_*` values and `enum ms_counter`
under their C names; every struct of the header as a `CStruct` (a struct.Struct that knows
its C name, its fields' names and their offsets); code -> name tables for the codes the header
defines (verdicts, directions, event kinds, TCP states, counters); the TC actions the programs
return. Everything that reads or writes the classifier's maps or events packs them with these.

tests/test_layout.py parses the header (defines and enum) and compiles it with gcc (sizes and
offsets): a value, struct or field that differs from C fails there, naming it. Change both
sides together, and bump MS_LAYOUT_VERSION when a pinned map's layout changes.

Dropped: what only bpf/classifier.c knows (its parse limits, its private structs).
"""

from __future__ import annotations

import struct
from typing import Final

from streamer.vocabulary import Action, Direction

# ---- #define MS_* (bpf/classifier.h), by their C names ------------------------------------

MS_LAYOUT_VERSION: Final = 6  # in the pin directory's name: maps of another layout are fresh

# Verdicts (struct ms_sess_val.verdict, ms_event.verdict, ms_rule_val.action, ms_bank's
# default_action); streamer.datapath.reference.Verdict has the same numbers.
MS_ALLOW: Final = 0
MS_DENY: Final = 1
MS_LOG: Final = 2
MS_PASS_L2: Final = 3
MS_DROP_PARSE: Final = 4
MS_DROP_FRAGMENT: Final = 5
MS_PASS_RELATED: Final = 6
MS_DROP_PRESSURE: Final = 7

MS_NO_STAGED: Final = 0xFF  # a flow's staged verdict when the views agree

MS_DEFAULT_SLOT: Final = 0
MS_FAILSAFE_SLOT: Final = 1

MS_MAX_FAILSAFE: Final = 16

MS_DIR_INGRESS: Final = 1
MS_DIR_EGRESS: Final = 2

# TCP session states (ms_sess_val.tcp_state)
MS_TCP_NONE: Final = 0
MS_TCP_SYN_SENT: Final = 1
MS_TCP_SYN_RECV: Final = 2
MS_TCP_ESTABLISHED: Final = 3
MS_TCP_FIN_WAIT: Final = 4
MS_TCP_CLOSE_WAIT: Final = 5
MS_TCP_LAST_ACK: Final = 6
MS_TCP_TIME_WAIT: Final = 7
MS_TCP_CLOSED: Final = 8

# Timeout classes (ms_sess_val.tclass): indexes of ms_settings.timeout_ns after the TCP states.
MS_TO_UDP: Final = 9
MS_TO_UDP_STREAM: Final = 10
MS_TO_ICMP: Final = 11
MS_TO_OTHER: Final = 12
MS_TO_FRAGMENT: Final = 13
MS_TO_MAX: Final = 16

MS_BLOOM_BANK_WORDS: Final = 1 << 19  # 64-bit words of `blooms` each bank owns

MS_EV_NEW: Final = 1
MS_EV_UPDATE: Final = 2

# ---- enum ms_counter: indexes into struct ms_counters.c ------------------------------------

C_TOTAL: Final = 0
C_ALLOWED: Final = 1
C_DENIED: Final = 2
C_LOGGED: Final = 3
C_BYTES_TOTAL: Final = 4
C_SESSION_HITS: Final = 5
C_POLICY_HITS: Final = 6
C_POLICY_MISSES: Final = 7
C_DIR_VERDICT: Final = 8  # 8 counters: see dir_verdict_counter
C_NEW_SESSIONS: Final = 16
C_PARSE_DROPS: Final = 17
C_FRAGMENT_DROPS: Final = 18
C_L2_PASSED: Final = 19
C_EVENTS_SENT: Final = 20
C_EVENTS_LOST: Final = 21
C_REJUDGED: Final = 22
C_SHAPE_PROBES: Final = 23
C_SESSION_CREATE_FAILED: Final = 24
C_CLOSED_SESSIONS: Final = 25
C_RENEWED_EXPIRED: Final = 26
C_RENEWED_CLOSED: Final = 27
C_RELATED_PASSED: Final = 28
C_SYN_NEW: Final = 29
C_HALF_OPEN_IN: Final = 30
C_HALF_OPEN_OUT: Final = 31
C_FRAG_FIRST: Final = 32
C_FRAG_FOLLOWED: Final = 33
C_FRAG_NO_FIRST: Final = 34
C_FRAG_OVERLAP: Final = 35
C_FRAG_TINY: Final = 36
C_PRESSURE_DROPS: Final = 37
C_FRAG_REPLACED: Final = 38
C_FAILSAFE_PASSED: Final = 39
C_FAILSAFE_FLOWS: Final = 40
C_STAGED_FLOWS: Final = 41
C_MAX: Final = 48


def dir_verdict_counter(direction: int, verdict: int) -> int:
    """The counter of packets by direction (MS_DIR_*) and verdict (MS_ALLOW/DENY/LOG), as
    the classifier indexes it."""
    return C_DIR_VERDICT + (direction - 1) * 4 + verdict


# ---- what the programs return (linux/pkt_cls.h) -------------------------------------------

TC_ACT_OK: Final = 0
TC_ACT_SHOT: Final = 2

# ---- code -> name tables of the header's codes ---------------------------------------------

# Every named counter of enum ms_counter, as counters() reports it (in index order); the
# C_DIR_VERDICT block is reported by direction and verdict instead.
COUNTER_NAMES: Final[dict[str, int]] = {
    "total_packets": C_TOTAL,
    "allowed_packets": C_ALLOWED,
    "denied_packets": C_DENIED,
    "logged_packets": C_LOGGED,
    "total_bytes": C_BYTES_TOTAL,
    "session_hits": C_SESSION_HITS,
    "policy_hits": C_POLICY_HITS,
    "policy_misses": C_POLICY_MISSES,
    "new_sessions": C_NEW_SESSIONS,
    "parse_drops": C_PARSE_DROPS,
    "fragment_drops": C_FRAGMENT_DROPS,
    "l2_passed": C_L2_PASSED,
    "events_sent": C_EVENTS_SENT,
    "events_lost": C_EVENTS_LOST,
    "rejudged_sessions": C_REJUDGED,
    "shape_probes": C_SHAPE_PROBES,
    "session_create_failed": C_SESSION_CREATE_FAILED,
    "closed_sessions": C_CLOSED_SESSIONS,
    "renewed_expired": C_RENEWED_EXPIRED,
    "renewed_closed": C_RENEWED_CLOSED,
    "related_passed": C_RELATED_PASSED,
    "syn_new_sessions": C_SYN_NEW,
    "half_open_opened": C_HALF_OPEN_IN,
    "half_open_left": C_HALF_OPEN_OUT,
    "fragments_first": C_FRAG_FIRST,
    "fragments_followed": C_FRAG_FOLLOWED,
    "fragment_drops_no_first": C_FRAG_NO_FIRST,
    "fragment_drops_overlap": C_FRAG_OVERLAP,
    "fragment_drops_tiny": C_FRAG_TINY,
    "pressure_drops": C_PRESSURE_DROPS,
    "fragments_replaced": C_FRAG_REPLACED,
    "failsafe_passed": C_FAILSAFE_PASSED,
    "failsafe_flows": C_FAILSAFE_FLOWS,
    "staged_flows": C_STAGED_FLOWS,
}
# The verdicts a flow (a session, an event, a rule) carries.
VERDICT_NAMES: Final[dict[int, str]] = {
    MS_ALLOW: Action.ALLOW.value,
    MS_DENY: Action.DENY.value,
    MS_LOG: Action.LOG.value,
}
DIRECTION_NAMES: Final[dict[int, str]] = {
    MS_DIR_INGRESS: Direction.INGRESS.value,
    MS_DIR_EGRESS: Direction.EGRESS.value,
}
EVENT_KIND_NAMES: Final[dict[int, str]] = {MS_EV_NEW: "new", MS_EV_UPDATE: "update"}
TCP_STATE_NAMES: Final[dict[int, str]] = {
    MS_TCP_NONE: "NONE",
    MS_TCP_SYN_SENT: "SYN_SENT",
    MS_TCP_SYN_RECV: "SYN_RECV",
    MS_TCP_ESTABLISHED: "ESTABLISHED",
    MS_TCP_FIN_WAIT: "FIN_WAIT",
    MS_TCP_CLOSE_WAIT: "CLOSE_WAIT",
    MS_TCP_LAST_ACK: "LAST_ACK",
    MS_TCP_TIME_WAIT: "TIME_WAIT",
    MS_TCP_CLOSED: "CLOSED",
}

# ---- the structs ---------------------------------------------------------------------------


class CStruct(struct.Struct):
    """One struct of bpf/classifier.h: a little-endian struct.Struct (maps hold host order,
    and the hosts we load on are little-endian) made of the struct's fields in C order, each
    a (C field name, struct format item) pair. Padding fields are `x` items (no value);
    fields the C side keeps in network byte order are `Ns` items (raw bytes)."""

    def __init__(self, c_name: str, *fields: tuple[str, str]) -> None:
        super().__init__("<" + "".join(fmt for _, fmt in fields))
        self.c_name = c_name
        self.fields = fields
        self._spans: dict[str, tuple[int, int]] = {}
        self._index: dict[str, int] = {}
        at = n = 0
        for name, fmt in fields:
            size = struct.calcsize("<" + fmt)
            self._spans[name] = (at, size)
            values = len(struct.unpack("<" + fmt, bytes(size)))
            if values == 1:
                self._index[name] = n
            n += values
            at += size

    def offset(self, field: str) -> int:
        """Where `field` starts, in bytes."""
        return self._spans[field][0]

    def field_size(self, field: str) -> int:
        return self._spans[field][1]

    def index(self, field: str) -> int:
        """The position of a one-value field in what `unpack` returns."""
        return self._index[field]

    def as_dict(self, raw: bytes) -> dict[str, object]:
        """The one-value fields of `raw` by name (arrays and padding left out)."""
        values = self.unpack(raw)
        return {name: values[i] for name, i in self._index.items()}

    def part(self, first: str, last: str) -> struct.Struct:
        """The fields from `first` to `last` (inclusive) on their own."""
        names = [name for name, _ in self.fields]
        items = self.fields[names.index(first) : names.index(last) + 1]
        return struct.Struct("<" + "".join(fmt for _, fmt in items))

    def grouped(self, *runs: tuple[str, str]) -> struct.Struct:
        """The same bytes with each run of fields (first, last: inclusive) read as one bytes
        item: for readers that keep fields they pass on together packed."""
        fmt = "<"
        names = [name for name, _ in self.fields]
        starts = {names.index(first): names.index(last) for first, last in runs}
        i = 0
        while i < len(names):
            if i in starts:
                last = starts[i]
                end = self.offset(names[last]) + self.field_size(names[last])
                fmt += f"{end - self.offset(names[i])}s"
                i = last + 1
            else:
                fmt += self.fields[i][1]
                i += 1
        return struct.Struct(fmt)


SESS_KEY: Final = CStruct(
    "ms_sess_key",
    ("ifindex", "I"),
    ("family", "B"),
    ("proto", "B"),
    ("pad", "H"),
    ("a", "16s"),
    ("b", "16s"),
    ("aport", "2s"),  # network byte order
    ("bport", "2s"),
)
SESS_VAL: Final = CStruct(
    "ms_sess_val",
    # the line every packet reads
    ("last_seen", "Q"),
    ("gen", "I"),
    ("rule_id", "I"),
    ("slot", "I"),
    ("verdict", "B"),
    ("orig_dir", "B"),
    ("a_is_src", "B"),
    ("tcp_state", "B"),
    ("tcp_flags", "B"),
    ("tclass", "B"),
    ("fins", "B"),
    ("staged_verdict", "B"),
    ("staged_rule_id", "I"),
    # the originator's line
    ("pkts_orig", "Q"),
    ("bytes_orig", "Q"),
    ("first_seen", "Q"),
    ("ev_last", "Q"),
    ("ev_pkts", "Q"),
    ("ev_bytes", "Q"),
    ("staged_slot", "I"),
    ("pad2", "4x"),
    ("pad2b", "8x"),
    # the replies' line
    ("pkts_reply", "Q"),
    ("bytes_reply", "Q"),
    ("pad3", "48x"),
)
FRAG_KEY: Final = CStruct(
    "ms_frag_key",
    ("ifindex", "I"),
    ("family", "B"),
    ("proto", "B"),
    ("pad", "H"),
    ("id", "I"),
    ("src", "16s"),
    ("dst", "16s"),
)
FRAG_VAL: Final = CStruct(
    "ms_frag_val",
    ("first_seen", "Q"),
    ("sport", "H"),
    ("dport", "H"),
    ("l4_end", "H"),
    ("proto", "B"),
    ("pad", "x"),
)
REAPED: Final = CStruct(
    "ms_reaped",
    ("expired", "Q"),
    ("closed", "Q"),
    ("half_open", "Q"),
    ("cleared", "Q"),
    ("frags", "Q"),
    ("reserved", "3Q"),
)
RULE_KEY4: Final = CStruct(
    "ms_rule_key4",
    ("shape", "H"),
    ("dir", "B"),
    ("proto", "B"),
    ("sport", "2s"),  # network byte order, as the addresses
    ("dport", "2s"),
    ("src", "4s"),
    ("dst", "4s"),
)
RULE_KEY6: Final = CStruct(
    "ms_rule_key6",
    ("shape", "H"),
    ("dir", "B"),
    ("proto", "B"),
    ("sport", "2s"),
    ("dport", "2s"),
    ("src", "16s"),
    ("dst", "16s"),
)
RULE_VAL: Final = CStruct(
    "ms_rule_val",
    ("score", "Q"),
    ("rule_id", "I"),
    ("slot", "I"),
    ("action", "B"),
    ("pad", "7x"),
    ("s_score", "Q"),
    ("s_rule_id", "I"),
    ("s_slot", "I"),
    ("s_action", "B"),
    ("s_pad", "7x"),
)
SHAPE: Final = CStruct(
    "ms_shape",
    ("src_mask", "16s"),  # network byte order
    ("dst_mask", "16s"),
    ("sport_mask", "2s"),
    ("dport_mask", "2s"),
    ("proto_mask", "B"),
    ("bloom_shift", "B"),
    ("pad", "2x"),
    ("max_score", "Q"),
    ("bloom_off", "I"),
    ("key_shape", "I"),  # bank * MS_MAX_SHAPES + the shape's id: `shape` in its rules' keys
)
BANK: Final = CStruct(
    "ms_bank",
    ("gen", "I"),
    ("nshapes4", "I"),
    ("nshapes6", "I"),
    ("default_action", "B"),
    ("staged_default", "B"),
    ("pad", "2x"),
)
JUDGING: Final = CStruct("ms_judging", ("n", "2Q"))  # judges in flight, by bank
FAILSAFE: Final = CStruct(
    "ms_failsafe",
    ("family", "B"),
    ("proto", "B"),
    ("dir", "B"),
    ("pad", "x"),
    ("port", "2s"),  # network byte order
    ("pad1", "2x"),
    ("addr", "16s"),
    ("mask", "16s"),
)
SETTINGS: Final = CStruct(
    "ms_settings",
    ("event_interval_ns", "Q"),
    ("timeout_ns", f"{MS_TO_MAX}Q"),
    ("nfailsafe", "I"),
    ("pad", "4x"),
    ("failsafe", f"{FAILSAFE.size * MS_MAX_FAILSAFE}s"),  # MS_MAX_FAILSAFE FAILSAFE structs
)
COUNTERS: Final = CStruct("ms_counters", ("c", f"{C_MAX}Q"))
RULE_CTR: Final = CStruct(
    "ms_rule_ctr",
    ("packets", "Q"),
    ("bytes", "Q"),
    ("last_hit", "Q"),
    ("staged_packets", "Q"),
    ("staged_bytes", "Q"),
    ("staged_flows", "Q"),
)
EVENT: Final = CStruct(
    "ms_event",
    ("ts", "Q"),
    ("packets", "Q"),
    ("bytes", "Q"),
    ("ifindex", "I"),
    ("rule_id", "I"),
    ("gen", "I"),
    ("family", "B"),
    ("proto", "B"),
    ("direction", "B"),
    ("verdict", "B"),
    ("src", "16s"),
    ("dst", "16s"),
    ("sport", "H"),  # host byte order
    ("dport", "H"),
    ("tcp_flags", "B"),
    ("kind", "B"),
    ("staged_verdict", "B"),
    ("pad", "x"),
    ("staged_rule_id", "I"),
    ("pad2", "4x"),
)
STRUCTS: Final = (
    SESS_KEY,
    SESS_VAL,
    FRAG_KEY,
    FRAG_VAL,
    REAPED,
    RULE_KEY4,
    RULE_KEY6,
    RULE_VAL,
    SHAPE,
    BANK,
    JUDGING,
    FAILSAFE,
    SETTINGS,
    COUNTERS,
    RULE_CTR,
    EVENT,
)

# A flow event as the event pipeline reads it: the fields events mostly repeat stay packed
# (meta: ifindex, rule_id, gen, family, proto, direction, verdict; tail: tcp_flags to pad2)
# so nine values come out per record, not seventeen. EVENT_META unpacks a meta.
EVENT_ROW: Final = EVENT.grouped(("ifindex", "verdict"), ("tcp_flags", "pad2"))
EVENT_META: Final = EVENT.part("ifindex", "verdict")
EVENT_META_FAMILY: Final = EVENT.offset("family") - EVENT.offset("ifindex")  # within a meta


def active_word(generation: int, bank: int) -> int:
    """The value of the `active` map (a u64): generation and bank, read in one load."""
    return generation << 1 | bank


def active_of(word: int) -> tuple[int, int]:
    """(generation, bank) of an `active` value."""
    return word >> 1, word & 1
