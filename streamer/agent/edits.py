"""One edit of the applied set as writes to the live tables: what changed, not the whole set.

In: an Edit (streamer.policy.state) made against `state` (the set before it) and a
TableChange begun on the datapath. Out: the change holds the entries of the rules added,
removed and changed, and of every rule using a group for the members that came and went;
the rules whose metadata the enricher must learn (None: gone). Raises what the change raises
(NeedsRecompile, TablesOutOfStep): the caller then compiles the whole set.
"""

from __future__ import annotations

from streamer.datapath.compiler import DEFAULT_ACTION_CODES, rule_ends
from streamer.datapath.ruletables import TableChange
from streamer.policy.model import Group, Rule, parse_address
from streamer.policy.state import Edit, PolicyState


def change_tables(change: TableChange, edit: Edit, state: PolicyState) -> dict[int, Rule | None]:
    """Put `edit` into `change`; returns rule_id -> the rule now (None: removed)."""
    changes: dict[int, Rule | None] = {}
    for rule in edit.removed:
        change.remove_rule(rule, *rule_ends(rule, state.groups))
        changes[rule.rule_id] = None
    for old, new in edit.changed:
        change.remove(old, *rule_ends(old, state.groups))
        change.add(new, *rule_ends(new, state.groups))
        changes[new.rule_id] = new
    for rule in edit.added:
        change.add_rule(rule, *rule_ends(rule, state.groups))
        changes[rule.rule_id] = rule
    for name, (before, _, added, removed) in edit.groups.items():
        _change_members(change, state, name, before, added, removed)
    if edit.default_action is not None:
        change.default_action = DEFAULT_ACTION_CODES[edit.default_action]
    return changes


def _change_members(
    change: TableChange,
    state: PolicyState,
    name: str,
    before: Group,
    added: list[str],
    removed: list[str],
) -> None:
    """The entries of every rule using group `name` for the members that came and went only:
    new (source, destination) pairs in, pairs that lost a member out."""
    gone = [parse_address(m) for m in removed]
    new = [parse_address(m) for m in added]
    for rule in state.users(name):
        src, dst = rule.match_data()[:2]
        src_is, dst_is = rule.src_group == name, rule.dst_group == name
        if src_is and dst_is:
            went = set(removed)
            kept = [parse_address(m) for m in before.members if m not in went]
            change.remove(rule, gone, kept + gone)
            change.remove(rule, kept, gone)
            change.add(rule, new, kept + new)
            change.add(rule, kept, new)
        elif src_is:
            # The other end: an address, or another group's members.
            dsts = state.groups[dst[0]].addrs() if rule.dst_group is not None else [dst]
            change.remove(rule, gone, dsts)
            change.add(rule, new, dsts)
        else:
            srcs = state.groups[src[0]].addrs() if rule.src_group is not None else [src]
            change.remove(rule, srcs, gone)
            change.add(rule, srcs, new)
