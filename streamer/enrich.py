"""Enrich: typed FlowEvents into SPEC §4 event objects (dicts ready for orjson).

Adds the rule's metadata as it was at the event's policy generation, host and interface
names, wall-clock time from the kernel's monotonic stamp and a per-agent sequence number.
Rule metadata of old generations is kept for a bounded number of generations, so events
still in flight after a policy change are described by the set that judged them.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from streamer.decode import FlowEvent
from streamer.policy import PolicySet

SCHEMA = "microseg.flow/v1"
KEEP_GENERATIONS = 16


class Enricher:
    """Stateful: owns the sequence counter and the generations' rule metadata."""

    def __init__(self, ifnames: dict[int, str], host: str | None = None) -> None:
        self.host = host or socket.gethostname()
        self.ifnames = dict(ifnames)
        self.seq = 0
        self._rules: OrderedDict[int, dict[int, dict[str, Any]]] = OrderedDict()
        self._clock_offset_ns = time.time_ns() - time.monotonic_ns()

    def add_generation(self, generation: int, policy: PolicySet) -> None:
        """Remember the rules of a newly applied generation (the oldest beyond a bound go)."""
        self._rules[generation] = {
            r.rule_id: {
                "rule_id": r.rule_id,
                "name": r.name,
                "priority": r.priority,
                "action": r.action.value,
            }
            for r in policy.policies
        }
        while len(self._rules) > KEEP_GENERATIONS:
            self._rules.popitem(last=False)

    def rule(self, generation: int, rule_id: int | None) -> dict[str, Any] | None:
        if rule_id is None:
            return None
        rules = self._rules.get(generation)
        if rules is None or rule_id not in rules:
            return {"rule_id": rule_id, "name": "", "priority": None, "action": None}
        return rules[rule_id]

    def wall_time(self, ts_ns: int) -> str:
        ns = ts_ns + self._clock_offset_ns
        dt = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"

    def enrich(self, ev: FlowEvent) -> dict[str, Any]:
        """The SPEC §4 object for one event; consumes one sequence number."""
        self.seq += 1
        return {
            "schema": SCHEMA,
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
