"""Reading the classifier's state: counters, sessions, per-rule hits, map fill, pressure.

In: the loaded maps (per-CPU counters, the session table, rule counters), the banks' rule
bookkeeping and the reaper's removal counts. Out: counters summed over CPUs under their API
names (streamer.datapath.layout.COUNTER_NAMES) with exact session gauges derived from them,
Session entries oriented as their flow's first packet went (with their staged verdict and
rule, and whether failsafe passed them), RuleCounters (hits, and what the rule decided in the
staged view), MapFill of every map that fills up, and `pressure` (all an operator watches
under load, in one read). Only reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from streamer.datapath.banks import Banks
from streamer.datapath.config import DatapathConfig
from streamer.datapath.layout import (
    BANK,
    C_MAX,
    COUNTER_NAMES,
    COUNTERS,
    DIRECTION_NAMES,
    FRAG_KEY,
    FRAG_VAL,
    MS_DEFAULT_SLOT,
    MS_FAILSAFE_SLOT,
    MS_NO_STAGED,
    RULE_CTR,
    SESS_KEY,
    SESS_VAL,
    TCP_STATE_NAMES,
    VERDICT_NAMES,
    dir_verdict_counter,
)
from streamer.datapath.maps import Maps, array_key
from streamer.datapath.reaper import R_CLEARED, R_CLOSED, R_EXPIRED, R_FRAGS, R_HALF_OPEN, Reaper

# positions in SESS_VAL.unpack()'s tuple
_SV_LAST_SEEN, _SV_GEN, _SV_RULE_ID = (SESS_VAL.index(f) for f in ("last_seen", "gen", "rule_id"))
_SV_VERDICT, _SV_ORIG_DIR, _SV_A_IS_SRC, _SV_TCP_STATE, _SV_TCP_FLAGS = (
    SESS_VAL.index(f) for f in ("verdict", "orig_dir", "a_is_src", "tcp_state", "tcp_flags")
)
_SV_PKTS_ORIG, _SV_BYTES_ORIG, _SV_FIRST_SEEN, _SV_PKTS_REPLY, _SV_BYTES_REPLY = (
    SESS_VAL.index(f)
    for f in ("pkts_orig", "bytes_orig", "first_seen", "pkts_reply", "bytes_reply")
)
_SV_SLOT, _SV_STAGED_VERDICT, _SV_STAGED_RULE_ID = (
    SESS_VAL.index(f) for f in ("slot", "staged_verdict", "staged_rule_id")
)
_NSHAPES4, _NSHAPES6 = BANK.index("nshapes4"), BANK.index("nshapes6")


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
    # the staged view's verdict where it differs from `verdict` (None: the views agree) and
    # its rule (None: its default action, or the views agree)
    staged_verdict: str | None = None
    staged_rule_id: int | None = None
    failsafe: bool = False  # a failsafe entry passed it (verdict allow, no rule)


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


@dataclass(frozen=True)
class RuleCounters:
    """Hits of a rule (flows it decided), and where the staged view's winner was this rule and
    the views differed, what it would have decided: staged packets, bytes, flows."""

    packets: int
    bytes: int
    last_hit_ns: int  # CLOCK_MONOTONIC (coarse); 0: never
    # What the rule decided in the staged view, where that differed from the enforced one
    staged_packets: int = 0
    staged_bytes: int = 0
    staged_flows: int = 0


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def session_key(
    ifindex: int, proto: int, src: IPAddress, dst: IPAddress, sport: int, dport: int
) -> bytes:
    """The session table key of a packet, as the classifier's make_key builds it: endpoint a
    is the lower (address, port) pair, addresses in network order (IPv4 in the first 4 of
    16 bytes), ports in network order."""
    if src.version != dst.version:
        raise ValueError(f"{src} and {dst} are not of one address family")
    a, b = (src, sport), (dst, dport)
    if (int(dst), dport) < (int(src), sport):
        a, b = b, a
    return SESS_KEY.pack(
        ifindex,
        src.version,
        proto,
        0,
        a[0].packed.ljust(16, b"\0"),
        b[0].packed.ljust(16, b"\0"),
        a[1].to_bytes(2, "big"),
        b[1].to_bytes(2, "big"),
    )


def _addr(family: int, raw: bytes) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


class Tables:
    """The readings of one loaded classifier."""

    def __init__(self, maps: Maps, config: DatapathConfig, banks: Banks, reaper: Reaper) -> None:
        self._maps = maps
        self._config = config
        self._banks = banks
        self._reaper = reaper

    def counters(self) -> dict[str, int]:
        """Global counters summed over CPUs, packets by direction and verdict, and the session
        gauges derived from them (see `session_gauges`)."""
        per_cpu = self._maps.percpu("counters", 0)
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
        r = self._reaper.reaped
        expired_reaped, closed_reaped, half_reaped = r[R_EXPIRED], r[R_CLOSED], r[R_HALF_OPEN]
        cleared, frags_reaped = r[R_CLEARED], r[R_FRAGS]
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
        slot = self._banks.slots.get(rule_id)
        if slot is None:
            return RuleCounters(0, 0, 0)
        return self._slot_counters(slot)

    def default_counters(self) -> RuleCounters:
        """Packets and bytes decided by the default action (staged: by the staged view's
        default where it differs from the enforced view)."""
        return self._slot_counters(MS_DEFAULT_SLOT)

    def failsafe_counters(self) -> RuleCounters:
        """Packets and bytes of failsafe flows."""
        return self._slot_counters(MS_FAILSAFE_SLOT)

    def _slot_counters(self, slot: int) -> RuleCounters:
        p = b = last = sp = sb = sf = 0
        for raw in self._maps.percpu("rule_stats", slot):
            cp, cb, cl, csp, csb, csf = RULE_CTR.unpack(raw[: RULE_CTR.size])
            p += cp
            b += cb
            last = max(last, cl)
            sp += csp
            sb += csb
            sf += csf
        return RuleCounters(p, b, last, sp, sb, sf)

    def all_rule_counters(self) -> dict[int, RuleCounters]:
        return {rid: self._slot_counters(slot) for rid, slot in self._banks.slots.items()}

    def sessions(self, limit: int | None = None) -> Iterator[Session]:
        """Session table entries (a snapshot walk: entries may come and go meanwhile)."""
        n = 0
        for key in self._maps.keys("sessions", SESS_KEY.size):
            raw = self._maps.lookup("sessions", key, SESS_VAL.size)
            if raw is None:
                continue
            yield self._session(key, raw)
            n += 1
            if limit is not None and n >= limit:
                return

    def session_count(self) -> int:
        """Entries in the session table: exact, from counters (no walk)."""
        return self.counters()["active_sessions"]

    def session_of(
        self, ifindex: int, proto: int, src: IPAddress, dst: IPAddress, sport: int, dport: int
    ) -> Session | None:
        """The session of one packet's 5-tuple on `ifindex` (either direction), by one lookup
        of its key (`session_key`), or None."""
        key = session_key(ifindex, proto, src, dst, sport, dport)
        raw = self._maps.lookup("sessions", key, SESS_VAL.size)
        return None if raw is None else self._session(key, raw)

    @staticmethod
    def _session(key: bytes, raw: bytes) -> Session:
        ifindex, family, proto, _, a, b, ap, bp = SESS_KEY.unpack(key)
        v = SESS_VAL.unpack(raw)
        last, gen, rule_id = v[_SV_LAST_SEEN], v[_SV_GEN], v[_SV_RULE_ID]
        verdict, orig_dir, a_is_src = v[_SV_VERDICT], v[_SV_ORIG_DIR], v[_SV_A_IS_SRC]
        tcp_state, tcp_flags = v[_SV_TCP_STATE], v[_SV_TCP_FLAGS]
        p0, b0, first = v[_SV_PKTS_ORIG], v[_SV_BYTES_ORIG], v[_SV_FIRST_SEEN]
        p1, b1 = v[_SV_PKTS_REPLY], v[_SV_BYTES_REPLY]
        sv = v[_SV_STAGED_VERDICT]
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
            staged_verdict=None if sv == MS_NO_STAGED else VERDICT_NAMES.get(sv, "?"),
            staged_rule_id=(v[_SV_STAGED_RULE_ID] or None) if sv != MS_NO_STAGED else None,
            failsafe=v[_SV_SLOT] == MS_FAILSAFE_SLOT,
        )

    def map_fill(self, counters: dict[str, int] | None = None) -> dict[str, MapFill]:
        """Entries, capacity and fill ratio of every map that fills up: sessions (exact, no
        walk; never evicts: a full table judges new flows without caching them), fragments
        (an LRU: a walk; `evictions` = remembered firsts that left other than by the reaper),
        rules4/rules6 (both banks), rule_slots (per-rule counters), shapes4/shapes6 (of the
        live bank). `counters`: a `counters()` reading to use instead of taking one."""
        c = self.counters() if counters is None else counters
        cfg = self._config
        out: dict[str, MapFill] = {}
        out["sessions"] = MapFill(c["active_sessions"], cfg.session_entries, 0)
        nfrag = sum(1 for _ in self._maps.walk("frags", FRAG_KEY.size, FRAG_VAL.size))
        gone = c["fragments_first"] - self._reaper.reaped[R_FRAGS] - nfrag
        out["fragments"] = MapFill(nfrag, cfg.frag_entries, max(0, gone))
        for fam in (4, 6):
            out[f"rules{fam}"] = MapFill(self._banks.rule_entries(fam), cfg.rule_entries, 0)
        # the rules' slots and the two reserved ones (default action, failsafe)
        out["rule_slots"] = MapFill(len(self._banks.slots) + 2, cfg.rule_slots, 0)
        gen, bank = self._banks.active()
        raw = self._maps.lookup("banks", array_key(bank), BANK.size)
        b = BANK.unpack(raw) if raw and gen else None
        n4, n6 = (b[_NSHAPES4], b[_NSHAPES6]) if b else (0, 0)
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
