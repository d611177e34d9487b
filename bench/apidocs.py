"""What the admin API benchmarks send: the lab ports their rules open, rule ids, bodies.

In: a rule-set kind (bench.rulesets.RULE_SETS: "palette", "irregular"), counts, a seed. Out:
the whole-set documents (the live sets, the bulk set with its check rule, the set with an
address group) and the single-rule and group bodies, as dicts. No rule of a generated set
covers a lab address, so lab traffic is decided only by the rules made here; default deny.
"""

from __future__ import annotations

from typing import Any

from bench.rulesets import RULE_SETS

Doc = dict[str, Any]

PORT = 7443  # the single-rule writes' and the small group's rule open it
PORT_ALT = 7444  # where PUT /policies/{id} moves the rule; the big group's rule opens it
PORT_DENIED = 7445  # no rule ever opens it: a refused connection shows default deny at work
BENCH_PRIORITY = 60000  # above every generated rule but the palette's top ones (never the lab)
FIRST_ID = 2_000_000  # rule_ids of the single-rule writes: above every generated id
GROUP_RULE_ID = 1_900_000  # the rule allowing PORT from the small group
BIG_GROUP_RULE_ID = 1_900_001  # the rule allowing PORT_ALT from the big group
GROUP = "bench"  # the small group: a few members, the lab peer added and removed
BIG_GROUP = "bench-big"  # the group replaced whole


def live_doc(kind: str, count: int, seed: int) -> Doc:
    """The generated set of `kind` with `count` rules (palette: at least 4)."""
    return RULE_SETS[kind](max(count, 4) if kind == "palette" else count, seed)


def bulk_doc(kind: str, count: int, seed: int) -> Doc:
    """`count` rules: the generated set of count - 1, and one rule allowing PORT (the check)."""
    doc = live_doc(kind, count - 1, seed)
    doc["policies"].append(port_rule(count, PORT, BENCH_PRIORITY, "bench-check"))
    return doc


def port_rule(rule_id: int, port: int, priority: int, name: str = "bench") -> Doc:
    """A rule allowing TCP to `port` from anywhere (ingress)."""
    return {
        "rule_id": rule_id, "name": name, "protocol": "tcp", "dst_port": port,
        "direction": "ingress", "action": "allow", "priority": priority,
    }  # fmt: skip


def group_rule(rule_id: int, group: str, port: int) -> Doc:
    """A rule allowing TCP to `port` from the members of `group` (ingress)."""
    return {
        "rule_id": rule_id, "name": f"bench-{group}", "src_group": group, "protocol": "tcp",
        "dst_port": port, "direction": "ingress", "action": "allow", "priority": BENCH_PRIORITY,
    }  # fmt: skip


def grouped_doc(kind: str, count: int, seed: int, members: list[str]) -> Doc:
    """The generated set of `count` rules, BIG_GROUP with `members` in the document's
    "groups", and the rule allowing PORT_ALT from it (SPEC §5's whole-set document)."""
    doc = live_doc(kind, count, seed)
    doc["groups"] = {BIG_GROUP: {"members": members}}
    doc["policies"].append(group_rule(BIG_GROUP_RULE_ID, BIG_GROUP, PORT_ALT))
    return doc
