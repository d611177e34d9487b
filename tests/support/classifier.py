"""Rule documents, policies, packets and counters for the classifier tests
(tests/test_datapath_*.py, BPF_PROG_TEST_RUN on the session's classifier).

`R` is a rule document (protocol any, action allow unless given), `pk` a reference-model
packet, `install` applies a policy and forgets every session, `expect_ref` is the action the
reference model gives a new flow, `pb` a rule's (packets, bytes), `Delta` the counters that
changed since it was made.
"""

from __future__ import annotations

from typing import Any

from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import RULE_KEY4, RULE_KEY6, TC_ACT_OK, TC_ACT_SHOT
from streamer.datapath.reference import Packet, judge
from streamer.datapath.tables import RuleCounters
from streamer.policy.model import PolicySet, parse_policy_document

PASS = TC_ACT_OK
DROP = TC_ACT_SHOT


def R(rule_id: int, **fields: Any) -> dict[str, Any]:
    """A rule document: protocol any and action allow unless given."""
    return {"rule_id": rule_id, "protocol": "any", "action": "allow", **fields}


def pk(
    src: str,
    dst: str,
    proto: int | str = "tcp",
    sport: int = 0,
    dport: int = 0,
    direction: str = "ingress",
    **kw: int,
) -> Packet:
    return Packet.of(src, dst, proto, sport, dport, direction, **kw)  # type: ignore[arg-type]


def install(dp: Datapath, default: str, *rules: dict[str, Any]) -> PolicySet:
    """Apply a policy set (compiled in the classifier's policy mode: staged_all or not) and
    forget every session: the next packet of any flow is new."""
    pol = parse_policy_document({"default_action": default, "policies": list(rules)})
    dp.apply(compile_policy(pol, dp.config.max_shapes, dp.config.staged_all))
    dp.clear_sessions()
    return pol


def expect_ref(pol: PolicySet, pkt: Packet) -> int:
    """The TC action the reference model gives a new flow."""
    return PASS if judge(pol, pkt).passes else DROP


def pb(counters: RuleCounters) -> tuple[int, int]:
    """A rule's counters as (packets, bytes)."""
    return counters.packets, counters.bytes


class Delta:
    """Counter changes since construction (only those that changed)."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.before = dp.counters()

    def __call__(self) -> dict[str, int]:
        now = self.dp.counters()
        return {
            k: now[k] - self.before[k]
            for k in now
            if now[k] != self.before[k] and k != "shape_probes"
        }


def rule_keys(dp: Datapath, family: int) -> int:
    """Entries of the kernel's rules map of one family (both banks), counted by a walk."""
    size = RULE_KEY4.size if family == 4 else RULE_KEY6.size
    return sum(1 for _ in dp._maps.keys(f"rules{family}", size))
