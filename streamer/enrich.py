"""Enrich: typed FlowEvents into SPEC §4 event objects (dicts ready for orjson).

Adds the rule's metadata as it was at the event's policy generation, host and interface
names, wall-clock time from the kernel's monotonic stamp and a per-agent sequence number.
Also builds the `lost` records that stand in the stream for events that never made it
(docs/flow-event.schema.json describes both).

Rule metadata of a generation is registered before the kernel switches to it (so no event of
it is ever described without it) and dropped once no event can still refer to an older one:
after a switch the kernel stamps every event with the new generation, so once the ring buffer
has been drained after the switch, older generations are never seen again (`retire`).
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from streamer.decode import FlowEvent
from streamer.policy import PolicySet

SCHEMA = "microseg.flow/v1"
# A bound on generations kept however the ring buffer is drained (a safety net: `retire`
# normally keeps only the live one).
MAX_GENERATIONS = 64
# The kernel stamps events with CLOCK_MONOTONIC; the wall-clock offset is re-read this often
# so a stepped clock (NTP) shows up in event times within seconds.
CLOCK_RESYNC_NS = 5_000_000_000


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
        self._rules: dict[int, dict[int, dict[str, Any]]] = {}
        self._retire_below = 0  # generations below this can go at the next drain
        self._lock = threading.Lock()
        self._clock_offset_ns = 0
        self._clock_read_at = -CLOCK_RESYNC_NS
        self._sec_cache: tuple[int, str] = (-1, "")

    # ---- generations -----------------------------------------------------------------------

    def add_generation(self, generation: int, policy: PolicySet) -> None:
        """Remember the rules of `generation` (call before the kernel switches to it)."""
        table = {
            r.rule_id: {
                "rule_id": r.rule_id,
                "name": r.name,
                "priority": r.priority,
                "action": r.action.value,
            }
            for r in policy.policies
        }
        with self._lock:
            rules = dict(self._rules)
            rules[generation] = table
            while len(rules) > MAX_GENERATIONS:
                del rules[min(rules)]
            self._rules = rules

    def forget(self, generation: int) -> None:
        """Drop a generation registered for a switch that did not happen."""
        with self._lock:
            rules = dict(self._rules)
            rules.pop(generation, None)
            self._rules = rules

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
        if below <= 0 or not any(g < below for g in self._rules):
            return
        with self._lock:
            self._rules = {g: r for g, r in self._rules.items() if g >= below}

    @property
    def generations(self) -> list[int]:
        return sorted(self._rules)

    def rule(self, generation: int, rule_id: int | None) -> dict[str, Any] | None:
        if rule_id is None:
            return None
        rules = self._rules.get(generation)
        if rules is None or rule_id not in rules:
            return {"rule_id": rule_id, "name": "", "priority": None, "action": None}
        return rules[rule_id]

    # ---- time and sequence -------------------------------------------------------------------

    def wall_time(self, ts_ns: int) -> str:
        """A CLOCK_MONOTONIC stamp as RFC 3339 UTC with nanoseconds."""
        now = time.monotonic_ns()
        if now - self._clock_read_at >= CLOCK_RESYNC_NS:
            self._clock_offset_ns = time.time_ns() - time.monotonic_ns()
            self._clock_read_at = now
        ns = ts_ns + self._clock_offset_ns
        sec, frac = divmod(ns, 1_000_000_000)
        cached_sec, text = self._sec_cache
        if sec != cached_sec:
            text = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._sec_cache = (sec, text)
        return f"{text}.{frac:09d}Z"

    def now(self) -> str:
        return self.wall_time(time.monotonic_ns())

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # ---- records -------------------------------------------------------------------------------

    def enrich(self, ev: FlowEvent) -> dict[str, Any]:
        """The SPEC §4 object for one event; consumes one sequence number."""
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
            "policy_generation": ev.generation,
        }

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
