"""Rules, policies and packets for the tests of the reference model
(`streamer.datapath.reference`): `rule(...)` is a validated `Rule` (protocol any, action allow
unless given), `policy(*rules)` a `PolicySet` (default allow unless given), `tcp4(...)` a TCP
packet from A4 to B4; A4/B4 and A6/B6 are the two ends in each family.
"""

from __future__ import annotations

from typing import Any

from streamer.datapath.reference import Packet
from streamer.policy.model import PolicySet, Rule

A4, B4 = "10.0.0.1", "10.0.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"


def rule(rule_id: int = 1, **fields: Any) -> Rule:
    base: dict[str, Any] = {"rule_id": rule_id, "protocol": "any", "action": "allow"}
    base.update(fields)
    return Rule.model_validate(base)


def policy(*rules: Rule, default: str = "allow") -> PolicySet:
    return PolicySet.model_validate({"default_action": default, "policies": list(rules)})


def tcp4(sport: int = 40000, dport: int = 80, direction: str = "ingress", **kw: Any) -> Packet:
    return Packet.of(A4, B4, "tcp", sport, dport, direction, **kw)  # type: ignore[arg-type]
