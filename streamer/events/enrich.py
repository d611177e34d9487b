"""Enrich: decoded events into contract §4 event records.

`render` is the hot path: a drained batch of raw rows straight into serialized records, ready
for the fan-out. Per combination of the fields events mostly repeat (interface, rule,
generation, protocol, direction, verdict, flags, kind, staged verdict and rule) a record
template is made once with those filled in; per event only nine values are formatted into it
(IPv4 text from a cached "a.b.c." prefix and an octet table: a flood of new sources costs no
cache misses). `enrich` makes the same object as a dict from one FlowEvent (tests check the
two agree byte for byte). Both add the rule's metadata as it was at the event's policy
generation (rule_id, name, priority, action, a group rule's src_group/dst_group names, a
staged rule's mode), the `staged` object where the staged view differs from the enforced one
(contract §6: its verdict and rule, described like `rule`; no `staged` key where they agree),
host and interface names, wall-clock time from the kernel's monotonic stamp and a per-agent
sequence number.
Also builds the `lost` records that stand in the stream for events that never made it
(docs/flow-event.schema.json describes both).

Rule metadata of a generation is registered before the kernel switches to it (so no event of
it is ever described without it) and dropped once no event can still refer to an older one:
after a switch the kernel stamps every event with the new generation, so once the ring buffer
has been drained after the switch, older generations are never seen again (`retire`). A
generation made by a few rule changes is registered as those changes over the one before it
(`add_changes`): it holds references to the rules, never copies, and a rule's JSON is made
when an event first names it.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from streamer.datapath.layout import (
    DIRECTION_NAMES,
    EVENT,
    EVENT_KIND_NAMES,
    EVENT_META,
    MS_NO_STAGED,
    VERDICT_NAMES,
)
from streamer.events.decode import _FLAG_TEXT, PROTOCOLS, FlowEvent, Row
from streamer.events.fanout import Item
from streamer.policy.model import PolicySet, Rule

SCHEMA = "microseg.flow/v1"
# A bound on generations kept however the ring buffer is drained (a safety net: `retire`
# normally keeps only the live one).
MAX_GENERATIONS = 64
# The kernel stamps events with CLOCK_MONOTONIC; the wall-clock offset is re-read this often
# so a stepped clock (NTP) shows up in event times within seconds.
CLOCK_RESYNC_NS = 5_000_000_000
# Addresses' text is cached by their raw bytes; past this many the cache starts over.
MAX_CACHED_ADDRESSES = 65536
MAX_CACHED_PREFIXES = 16384  # IPv4 /24s
# Records pre-filled per combination of repeated fields (`Enricher._template`); past this many
# the cache starts over.
MAX_TEMPLATES = 4096
# Rules' metadata JSON, made when an event names them; past this many the cache starts over.
MAX_CACHED_RULES = 65536
# Changes kept over a generation's base before they are folded into a new base.
MAX_OVERLAY = 4096


def _kept_json(obj: Any) -> bytes:
    """orjson's serialization of `obj`, copied to its exact size: orjson hands back bytes
    that keep their 4 KiB output buffer, which for 100,000 rules of a generation is 400 MiB
    where 10 would do. For values kept long; transient ones need no copy."""
    return bytes(memoryview(orjson.dumps(obj)))


def _names(table: dict[int, str]) -> tuple[bytes, ...]:
    """A JSON string for each byte value: the table's name or "unknown"."""
    return tuple(_kept_json(table.get(v, "unknown")) for v in range(256))


_DIRECTION_JSON = _names(DIRECTION_NAMES)
_VERDICT_JSON = _names(VERDICT_NAMES)
_KIND_JSON = _names(EVENT_KIND_NAMES)
_PROTOCOL_JSON = tuple(_kept_json(PROTOCOLS.get(v, str(v))) for v in range(256))
_FLAGS_JSON = tuple(_kept_json(t) for t in _FLAG_TEXT)
# The record `enrich` makes, as orjson writes it (tests compare them), filled in two steps:
# the names events mostly repeat first (`Enricher._template`), then the per-event values.
_FLOW_TEMPLATE = (
    b'{"schema":"' + SCHEMA.encode() + b'","type":"flow","seq":%%d,"time":"%%b.%%09dZ",'
    b'"host":%b,"iface":%b,"direction":%b,"verdict":%b,"src_ip":"%%b","dst_ip":"%%b",'
    b'"src_port":%%d,"dst_port":%%d,"protocol":%b,"tcp_flags":%b,"packets":%%d,"bytes":%%d,'
    b'"kind":%b,"rule":%b%b,"policy_generation":%b}'
)
# A record's tail (layout.EVENT_ROW: tcp_flags to pad2), where the staged verdict and rule are.
_TAIL_STAGED_VERDICT = EVENT.offset("staged_verdict") - EVENT.offset("tcp_flags")
_TAIL_STAGED_RULE = EVENT.offset("staged_rule_id") - EVENT.offset("tcp_flags")
_OCTETS = tuple(b"%d" % i for i in range(256))


class _Generation(NamedTuple):
    """One policy generation's rules: a base (rule_id -> rule; never changed once made, shared
    between generations) and the changes over it (None: the rule is gone)."""

    base: dict[int, Rule]
    overlay: dict[int, Rule | None]

    def get(self, rule_id: int) -> Rule | None:
        if rule_id in self.overlay:
            return self.overlay[rule_id]
        return self.base.get(rule_id)


def rule_meta(rule: Rule) -> dict[str, Any]:
    """The `rule` object of an event (contract §4) for one rule."""
    return {
        "rule_id": rule.rule_id,
        "name": rule.name,
        "priority": rule.priority,
        "action": rule.action.value,
        **({"src_group": rule.src_group} if rule.src_group is not None else {}),
        **({"dst_group": rule.dst_group} if rule.dst_group is not None else {}),
        **({"mode": "staged"} if rule.staged else {}),
    }


class Enricher:
    """Stateful: owns the sequence counter and the generations' rule metadata.

    `enrich`, `lost_record` and `retire` run on the event loop; `add_generation` and `forget`
    may run in a worker thread (the policy store applies there): they only replace whole
    dict entries, which the loop thread sees atomically.
    """

    def __init__(self, ifnames: dict[int, str], host: str | None = None) -> None:
        self.host = host or socket.gethostname()
        self.ifnames = dict(ifnames)
        self.seq = 0
        self._gens: dict[int, _Generation] = {}
        self._host_json = _kept_json(self.host)
        self._iface_json = {i: _kept_json(n) for i, n in self.ifnames.items()}
        self._ip6: dict[bytes, bytes] = {}
        self._ip4_prefix: dict[bytes, bytes] = {}
        # meta + tail bytes of a row -> (record template, address family); replaced
        # whenever names or rules change (by another thread, too: a whole new dict).
        self._templates: dict[bytes, tuple[bytes, int]] = {}
        self._json: dict[int, tuple[Rule, bytes]] = {}
        self._retire_below = 0  # generations below this can go at the next drain
        self._lock = threading.Lock()
        self._clock_offset_ns = 0
        self._clock_read_at = -CLOCK_RESYNC_NS
        self._sec_cache: tuple[int, str] = (-1, "")

    def add_interfaces(self, ifnames: dict[int, str]) -> None:
        """Name more interfaces (index -> name) in events from now on."""
        self.ifnames.update(ifnames)
        self._iface_json = {i: _kept_json(n) for i, n in self.ifnames.items()}
        self._templates = {}

    # ---- generations -----------------------------------------------------------------------

    def add_generation(self, generation: int, policy: PolicySet) -> None:
        """Remember the rules of `generation` (call before the kernel switches to it)."""
        self._register(generation, _Generation({r.rule_id: r for r in policy.policies}, {}))

    def add_changes(self, generation: int, changes: dict[int, Rule | None]) -> None:
        """Remember `generation` as the newest registered one with `changes` (rule_id -> the
        rule now, None: deleted) made over it (call before the kernel switches to it)."""
        gens = self._gens
        if not gens:
            self._register(generation, _Generation({}, dict(changes)))
            return
        prev = gens[max(gens)]
        overlay = {**prev.overlay, **changes}
        if len(overlay) <= MAX_OVERLAY:
            self._register(generation, _Generation(prev.base, overlay))
            return
        base = dict(prev.base)
        for rid, rule in overlay.items():
            if rule is None:
                base.pop(rid, None)
            else:
                base[rid] = rule
        self._register(generation, _Generation(base, {}))

    def _register(self, generation: int, gen: _Generation) -> None:
        with self._lock:
            gens = dict(self._gens)
            gens[generation] = gen
            while len(gens) > MAX_GENERATIONS:
                del gens[min(gens)]
            self._gens = gens
            self._templates = {}

    def forget(self, generation: int) -> None:
        """Drop a generation registered for a switch that did not happen."""
        with self._lock:
            self._gens = {g: r for g, r in self._gens.items() if g != generation}
            self._templates = {}

    def switched(self, generation: int) -> None:
        """The kernel now stamps events with `generation` (and nothing older from now on)."""
        with self._lock:
            self._retire_below = max(self._retire_below, generation)

    def retire_point(self) -> int:
        """Read before draining the ring buffer; pass to `retire` after the drain."""
        return self._retire_below

    def retire(self, below: int) -> None:
        """Forget generations older than `below`: the drain that just finished started after
        the kernel switched to `below`, so no event of an older one is left to describe."""
        if below <= 0 or not any(g < below for g in self._gens):
            return
        with self._lock:
            self._gens = {g: r for g, r in self._gens.items() if g >= below}

    @property
    def generations(self) -> list[int]:
        return sorted(self._gens)

    def rule(self, generation: int, rule_id: int | None) -> dict[str, Any] | None:
        if rule_id is None:
            return None
        gen = self._gens.get(generation)
        rule = gen.get(rule_id) if gen is not None else None
        if rule is None:
            return {"rule_id": rule_id, "name": "", "priority": None, "action": None}
        return rule_meta(rule)

    def _rule_json(self, generation: int, rule_id: int) -> bytes:
        gen = self._gens.get(generation)
        rule = gen.get(rule_id) if gen is not None else None
        if rule is None:
            return orjson.dumps(self.rule(generation, rule_id))
        cached = self._json.get(rule_id)
        if cached is not None and cached[0] is rule:
            return cached[1]
        if len(self._json) >= MAX_CACHED_RULES:
            self._json = {}
        text = _kept_json(rule_meta(rule))
        self._json[rule_id] = (rule, text)
        return text

    # ---- time and sequence -------------------------------------------------------------------

    def _clock_offset(self) -> int:
        """Wall clock minus CLOCK_MONOTONIC, in ns (re-read every CLOCK_RESYNC_NS)."""
        now = time.monotonic_ns()
        if now - self._clock_read_at >= CLOCK_RESYNC_NS:
            self._clock_offset_ns = time.time_ns() - time.monotonic_ns()
            self._clock_read_at = now
        return self._clock_offset_ns

    def _second(self, sec: int) -> str:
        """RFC 3339 UTC text of a whole second (the last one is cached: events come in bursts)."""
        cached_sec, text = self._sec_cache
        if sec != cached_sec:
            text = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._sec_cache = (sec, text)
        return text

    def wall_time(self, ts_ns: int) -> str:
        """A CLOCK_MONOTONIC stamp as RFC 3339 UTC with nanoseconds."""
        sec, frac = divmod(ts_ns + self._clock_offset(), 1_000_000_000)
        return f"{self._second(sec)}.{frac:09d}Z"

    def now(self) -> str:
        return self.wall_time(time.monotonic_ns())

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # ---- records -------------------------------------------------------------------------------

    def _ip_text(self, family: int, raw: bytes) -> bytes:
        """An address's text (IPv6: cached by its raw bytes)."""
        if family == 4:
            return self._ip4_prefix_text(raw) + _OCTETS[raw[3]]
        cache = self._ip6
        text = cache.get(raw)
        if text is None:
            if len(cache) >= MAX_CACHED_ADDRESSES:
                cache.clear()
            text = cache[raw] = socket.inet_ntop(socket.AF_INET6, raw).encode()
        return text

    def _ip4_prefix_text(self, raw: bytes) -> bytes:
        """ "a.b.c." of an IPv4 address's first three octets (cached by them: a table of
        whole addresses would miss on every new host, and thrash the CPU's caches when
        there are many; one entry per /24 does neither)."""
        cache = self._ip4_prefix
        text = cache.get(raw[:3])
        if text is None:
            if len(cache) >= MAX_CACHED_PREFIXES:
                cache.clear()
            text = cache[raw[:3]] = b"%d.%d.%d." % (raw[0], raw[1], raw[2])
        return text

    def _template(self, meta: bytes, tail: bytes) -> tuple[bytes, int]:
        """The record of one combination of the fields events mostly repeat (interface,
        rule, generation, family, protocol, direction, verdict, flags, kind, staged verdict
        and rule) with those
        filled in: what is left per event is 9 values. With the address family."""
        ifindex, rule_id, gen, family, proto, direction, verdict = EVENT_META.unpack(meta)
        tcp_flags, kind, staged_verdict = tail[0], tail[1], tail[_TAIL_STAGED_VERDICT]
        staged = b""
        if staged_verdict != MS_NO_STAGED:
            at = _TAIL_STAGED_RULE
            staged_rule = int.from_bytes(tail[at : at + 4], "little")
            staged = (
                b',"staged":{"verdict":'
                + _VERDICT_JSON[staged_verdict]
                + b',"rule":'
                + (self._rule_json(gen, staged_rule) if staged_rule else b"null")
                + b"}"
            )
        iface = self._iface_json.get(ifindex)
        if iface is None:
            iface = orjson.dumps(self.ifnames.get(ifindex, str(ifindex)))
        rule = self._rule_json(gen, rule_id) if rule_id else b"null"
        consts = (
            self._host_json,
            iface,
            _DIRECTION_JSON[direction],
            _VERDICT_JSON[verdict],
            _PROTOCOL_JSON[proto],
            _FLAGS_JSON[tcp_flags] if proto == 6 else b"null",
            _KIND_JSON[kind],
            rule,
            staged,
            b"%d" % gen,
        )
        # Names may hold a '%': escaped, they come out of the second formatting as they are.
        tpl = _FLOW_TEMPLATE % tuple(c.replace(b"%", b"%%") for c in consts)
        return tpl, family

    def render(self, rows: list[Row]) -> list[Item]:
        """Decoded rows (address family 4 or 6) into serialized flow records, each with the
        next sequence number; the same records `enrich` describes."""
        born = time.monotonic_ns()
        offset = self._clock_offset()
        sec_text = b""
        seq = self.seq
        templates = self._templates
        if len(templates) >= MAX_TEMPLATES:
            templates.clear()
        prefixes, prefix_text, octets = self._ip4_prefix, self._ip4_prefix_text, _OCTETS
        ip6, ip_text = self._ip6, self._ip_text
        out: list[Item] = []
        append = out.append
        # The monotonic stamps [lo, hi) fall in the wall-clock second whose text is sec_text.
        lo = hi = 0
        last_meta = last_tail = b""
        tpl, family = b"", 0
        for ts, packets, nbytes, meta, src, dst, sport, dport, tail in rows:
            seq += 1
            if not lo <= ts < hi:
                sec = (ts + offset) // 1_000_000_000
                sec_text = self._second(sec).encode()
                lo = sec * 1_000_000_000 - offset
                hi = lo + 1_000_000_000
            frac = ts - lo
            if meta != last_meta or tail != last_tail:
                # Events come in runs of the same kind (one interface, rule, verdict).
                t = templates.get(meta + tail)
                if t is None:
                    t = templates[meta + tail] = self._template(meta, tail)
                tpl, family = t
                last_meta, last_tail = meta, tail
            if family == 4:
                s = prefixes.get(src[:3]) or prefix_text(src)
                s += octets[src[3]]
                d = prefixes.get(dst[:3]) or prefix_text(dst)
                d += octets[dst[3]]
            else:
                s = ip6.get(src) or ip_text(6, src)
                d = ip6.get(dst) or ip_text(6, dst)
            append(
                Item(
                    seq,
                    1,
                    tpl % (seq, sec_text, frac, s, d, sport, dport, packets, nbytes),
                    s + b"->" + d,
                    born,
                )
            )
        self.seq = seq
        return out

    def enrich(self, ev: FlowEvent) -> dict[str, Any]:
        """The contract §4 object for one event; consumes one sequence number."""
        self.seq += 1
        return {
            "schema": SCHEMA,
            "type": "flow",
            "seq": self.seq,
            "time": self.wall_time(ev.ts_ns),
            "host": self.host,
            "iface": self.ifnames.get(ev.ifindex, str(ev.ifindex)),
            "direction": ev.direction,
            "verdict": ev.verdict,
            "src_ip": ev.src_ip,
            "dst_ip": ev.dst_ip,
            "src_port": ev.src_port,
            "dst_port": ev.dst_port,
            "protocol": ev.protocol_name,
            "tcp_flags": ev.tcp_flags_text,
            "packets": ev.packets,
            "bytes": ev.bytes,
            "kind": ev.kind,
            "rule": self.rule(ev.generation, ev.rule_id),
            **self._staged(ev),
            "policy_generation": ev.generation,
        }

    def _staged(self, ev: FlowEvent) -> dict[str, Any]:
        """The `staged` member of an event (contract §6), or nothing where the views agree."""
        if ev.staged_verdict is None:
            return {}
        return {
            "staged": {
                "verdict": ev.staged_verdict,
                "rule": self.rule(ev.generation, ev.staged_rule_id),
            }
        }

    def alert_record(self, fields: dict[str, Any]) -> dict[str, Any]:
        """An `alert` record (streamer.agent.pressure.AlertChange.fields()) with its own sequence
        number: the classifier under pressure, in the same stream as the flows."""
        obj: dict[str, Any] = {
            "schema": SCHEMA,
            "type": "alert",
            "seq": self.next_seq(),
            "time": self.now(),
            "host": self.host,
        }
        obj.update(fields)
        return obj

    def lost_record(
        self, lost: int, stage: str, *, first_seq: int | None = None, last_seq: int | None = None
    ) -> dict[str, Any]:
        """A `lost` record: `lost` flow events are missing from the stream it goes into.

        Losses before numbering (kernel, decode) get a sequence number of their own. Losses
        of numbered events (a sink's queue, the spool) carry `seq` = the last missing event's
        number and `first_seq` = the first's: the gap they explain.
        """
        seq = self.next_seq() if last_seq is None else last_seq
        obj: dict[str, Any] = {
            "schema": SCHEMA,
            "type": "lost",
            "seq": seq,
            "time": self.now(),
            "host": self.host,
            "lost": lost,
            "stage": stage,
        }
        if first_seq is not None:
            obj["first_seq"] = first_seq
        return obj
