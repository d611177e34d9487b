"""The applied policy as the store holds it, and the edits that move it.

In: a validated PolicySet (`PolicyState.of`), then `Edit`s (rules added, removed, changed; a
new default action; or a whole new set). Out: the state after each edit, changed in place in
time proportional to the edit (`PolicyState.apply`), a PolicySet view of it on demand
(`policy_set`, built once per state), and the journal record of an edit.

Rules are kept by rule_id in insertion order, so a single-rule change never walks the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamer.policy.model import Group, PolicySet, Rule
from streamer.vocabulary import DefaultAction


@dataclass
class Edit:
    """One change of the applied set. `whole`: a whole-set replace; else rules `added`,
    `removed` and `changed` (before, after), group members (`groups`) and a new
    `default_action` (None: unchanged). `record`: what the journal keeps of it."""

    what: str
    added: list[Rule] = field(default_factory=list)
    removed: list[Rule] = field(default_factory=list)
    changed: list[tuple[Rule, Rule]] = field(default_factory=list)
    default_action: DefaultAction | None = None
    whole: PolicySet | None = None
    record: dict[str, Any] = field(default_factory=dict)
    # name -> (the group before, after, members added, members removed): a member change
    groups: dict[str, tuple[Group, Group, list[str], list[str]]] = field(default_factory=dict)


class PolicyState:
    """The rules by rule_id, the address groups and the default action; `policy_set` is a
    PolicySet view. Group changes come as whole-set edits."""

    def __init__(
        self,
        default_action: DefaultAction,
        rules: dict[int, Rule],
        groups: dict[str, Group] | None = None,
    ) -> None:
        self.default_action = default_action
        self.rules = rules
        self.groups: dict[str, Group] = groups or {}
        self._view: PolicySet | None = None
        self._users: dict[str, set[int]] | None = None  # group -> rule_ids naming it

    @classmethod
    def of(cls, policy: PolicySet) -> PolicyState:
        return cls(
            policy.default_action, {r.rule_id: r for r in policy.policies}, dict(policy.groups)
        )

    def policy_set(self) -> PolicySet:
        """The state as a PolicySet (built without validating again; kept until a change)."""
        view = self._view
        if view is None:
            view = self._view = PolicySet.model_construct(
                default_action=self.default_action,
                groups=dict(self.groups),
                policies=list(self.rules.values()),
            )
        return view

    def get(self, rule_id: int) -> Rule | None:
        return self.rules.get(rule_id)

    def users(self, name: str) -> list[Rule]:
        """The rules naming group `name` on either end, by rule_id (indexed: no walk)."""
        if self._users is None:
            self._users = {}
            for r in self.rules.values():
                _index(self._users, r, True)
        ids = self._users.get(name, set())
        return [self.rules[i] for i in sorted(ids)]

    def __len__(self) -> int:
        return len(self.rules)

    def after(self, edit: Edit) -> PolicySet:
        """The set this edit leads to, as a PolicySet (for appliers that take whole sets)."""
        if edit.whole is not None:
            return edit.whole
        rules = dict(self.rules)
        _move(rules, edit)
        groups = dict(self.groups)
        for name, (_, after, _, _) in edit.groups.items():
            groups[name] = after
        return PolicySet.model_construct(
            default_action=edit.default_action or self.default_action,
            groups=groups,
            policies=list(rules.values()),
        )

    def apply(self, edit: Edit) -> None:
        """Move to the state after `edit` (which was made against this state)."""
        self._view = None
        for name, (_, group, _, _) in edit.groups.items():
            self.groups[name] = group
        if self._users is not None and edit.whole is None:
            for r in edit.removed:
                _index(self._users, r, False)
            for before, after in edit.changed:
                _index(self._users, before, False)
                _index(self._users, after, True)
            for r in edit.added:
                _index(self._users, r, True)
        if edit.whole is not None:
            self._users = None
            self.default_action = edit.whole.default_action
            self.rules = {r.rule_id: r for r in edit.whole.policies}
            self.groups = dict(edit.whole.groups)
            return
        _move(self.rules, edit)
        if edit.default_action is not None:
            self.default_action = edit.default_action


def _index(users: dict[str, set[int]], rule: Rule, add: bool) -> None:
    for name in {rule.src_group, rule.dst_group} - {None}:
        assert name is not None
        if add:
            users.setdefault(name, set()).add(rule.rule_id)
        else:
            users.get(name, set()).discard(rule.rule_id)


def _move(rules: dict[int, Rule], edit: Edit) -> None:
    for r in edit.removed:
        del rules[r.rule_id]
    for _, after in edit.changed:
        rules[after.rule_id] = after
    for r in edit.added:
        rules[r.rule_id] = r


def replay(state: PolicyState, record: dict[str, Any]) -> None:
    """Apply one journal record (as `Edit.record` wrote it) to `state`.

    Raises ValueError (or the model's PolicyError) for a record that does not fit the state."""
    op = record.get("op")
    if op == "add" or op == "update":
        rule = Rule.model_validate(record["rule"])
        exists = rule.rule_id in state.rules
        if exists != (op == "update"):
            raise ValueError(f"journal: {op} of rule {rule.rule_id} does not fit the state")
        state.rules[rule.rule_id] = rule
    elif op == "delete":
        if state.rules.pop(int(record["rule_id"]), None) is None:
            raise ValueError(f"journal: delete of unknown rule {record['rule_id']}")
    elif op == "promote":
        for rid in record["rule_ids"]:
            staged = state.rules.get(int(rid))
            if staged is None or not staged.staged:
                raise ValueError(f"journal: promote of rule {rid}, which is not staged")
            state.rules[staged.rule_id] = enforced(staged)
    elif op == "sync":
        for rid in record["removed"]:
            if state.rules.pop(int(rid), None) is None:
                raise ValueError(f"journal: sync removes unknown rule {rid}")
        for doc in record["put"]:
            rule = Rule.model_validate(doc)
            state.rules[rule.rule_id] = rule
        if "default_action" in record:
            state.default_action = DefaultAction(record["default_action"])
    elif op == "default":
        state.default_action = DefaultAction(record["default_action"])
    elif op == "set_group":
        state.groups[record["name"]] = Group.model_validate({"members": record["members"]})
    elif op == "add_members" or op == "remove_members":
        group = state.groups[record["name"]]
        members = record["members"]
        if op == "add_members":
            state.groups[record["name"]] = group.with_members(members)[0]
        else:
            state.groups[record["name"]] = group.without_members(members)[0]
    else:
        raise ValueError(f"journal: unknown record {op!r}")
    state._view = None


def diff_edit(state: PolicyState, new: PolicySet, what: str) -> Edit | None:
    """The edit that moves `state` to `new` in place: rules added, removed and changed and a
    new default action (groups the same), or the members of one group (nothing else
    changed). None when the sets differ otherwise (a whole-set replace is needed). An empty
    edit (nothing in it) when they are the same."""
    if new.groups.keys() != state.groups.keys():
        return None
    changed_groups = [n for n, g in new.groups.items() if state.groups[n] != g]
    default = new.default_action if new.default_action != state.default_action else None
    new_rules = {r.rule_id: r for r in new.policies}
    added = [r for rid, r in new_rules.items() if rid not in state.rules]
    removed = [r for rid, r in state.rules.items() if rid not in new_rules]
    changed = [
        (old, r)
        for rid, r in new_rules.items()
        if (old := state.rules.get(rid)) is not None and old != r
    ]
    if changed_groups:
        if len(changed_groups) > 1 or added or removed or changed or default is not None:
            return None
        name = changed_groups[0]
        before, after = state.groups[name], new.groups[name]
        kept = set(after.members)
        was = set(before.members)
        came = [m for m in after.members if m not in was]
        went = [m for m in before.members if m not in kept]
        return Edit(
            what,
            groups={name: (before, after, came, went)},
            record={"op": "set_group", "name": name, "members": list(after.members)},
        )
    record: dict[str, Any] = {
        "op": "sync",
        "removed": [r.rule_id for r in removed],
        "put": [r.to_api() for r in added] + [b.to_api() for _, b in changed],
    }
    if default is not None:
        record["default_action"] = default.value
    return Edit(
        what, added=added, removed=removed, changed=changed, default_action=default, record=record
    )


def is_empty(edit: Edit) -> bool:
    """Nothing in it: no rule, group or default action changes."""
    return (
        edit.whole is None
        and not (edit.added or edit.removed or edit.changed or edit.groups)
        and edit.default_action is None
    )


def enforced(rule: Rule) -> Rule:
    """`rule` in mode enforce (a promoted staged rule), everything else as it was."""
    doc = rule.to_api()
    doc.pop("mode", None)
    return Rule.model_validate(doc)
