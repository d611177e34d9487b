"""The policy store: the applied set and its generation, in the kernel and on disk, never apart.

In: whole sets, single-rule changes and changes of one address group (from the API, SIGHUP,
`microseg policy load`). Out: the
new set enforced in the kernel *and* persisted in the state dir before the call returns, or
neither (an error, with kernel and disk as they were). Writes are serialized; a member change
that changes nothing is not applied. Dry runs compute the diff and the live sessions whose
verdict would change, and apply nothing.

A single-rule change costs what it touches: the state moves in place (streamer.policy.state),
the kernel takes only the entries it changes (an `EditApplier`), and the disk one journal line
(streamer.policy.journal); a whole set is compiled and written whole, and becomes the new
snapshot. The kernel is switched first and the disk second; if the disk write fails the kernel
is switched back.

Confirm or revert (contract §6): a write with `WriteOptions.confirm_within` is applied at once
and becomes the pending change (streamer.policy.pending: recorded with the set it replaced
before the change is saved). Until `confirm` or `revert` no other write is made
(PendingConflict); `revert` puts the replaced set back as a new generation. A write's `check`
(the lockout guard) sees the set it leads to before anything is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol

import orjson

from streamer.datapath.layout import VERDICT_NAMES
from streamer.datapath.reference import Packet, judge
from streamer.policy.failsafe import FailsafeRule
from streamer.policy.journal import Journal, JournalError, read_state
from streamer.policy.model import (
    Group,
    PolicyError,
    PolicySet,
    Rule,
    check_group_name,
    parse_members,
    parse_policy_document,
    unknown_group_message,
)
from streamer.policy.pending import (
    PendingChange,
    PendingError,
    clear_pending,
    read_pending,
    rfc3339,
    set_aside,
    write_pending,
)
from streamer.policy.state import Edit, PolicyState, diff_edit, enforced, is_empty, replay
from streamer.vocabulary import DefaultAction

log = logging.getLogger("microseg.store")

CHANGES_FILE = "changes.log"


class StoreError(Exception):
    """A change that cannot be made; `status` and `code` say how the API answers it."""

    status = 400
    code = "invalid"


class RuleNotFound(StoreError):
    status = 404
    code = "not_found"


class DuplicateRule(StoreError):
    status = 409
    code = "conflict"


class GroupNotFound(StoreError):
    status = 404
    code = "not_found"


class GroupInUse(StoreError):
    """A group that rules name cannot be deleted."""

    status = 409
    code = "in_use"


class NotStaged(StoreError):
    """A promote of a rule that is not staged."""

    status = 409
    code = "not_staged"


class ApplyFailed(StoreError):
    """The kernel or the disk refused the change; nothing was changed."""

    status = 503
    code = "apply_failed"


class PendingConflict(StoreError):
    """Another change waits for its confirmation: no write until it is confirmed or reverted."""

    status = 409
    code = "pending"


class Managed(StoreError):
    """A local write to an agent whose policy the fleet decides (contract §7)."""

    status = 409
    code = "managed"


class NotPending(StoreError):
    """A confirmation of a generation that is not the one waiting."""

    status = 409
    code = "not_pending"


@dataclass(frozen=True)
class WriteOptions:
    """How a write is made, beyond what it changes.

    `confirm_within`: seconds (MIN_CONFIRM_S..MAX_CONFIRM_S) until the change is reverted
    unless confirmed (None: it stays). `check`: called with the set the write leads to before
    anything is applied (the lockout guard); raises a StoreError to refuse the write.
    """

    confirm_within: int | None = None
    check: Callable[[PolicySet], None] | None = None
    # Made by the fleet follower (streamer/fleet/follower.py): the one writer of a managed store.
    fleet: bool = False


class LiveSession(Protocol):
    """What a dry run needs of a session (streamer.datapath.tables.Session has it): the
    flow's first packet and the verdict it holds."""

    @property
    def family(self) -> int: ...
    @property
    def protocol(self) -> int: ...
    @property
    def src_ip(self) -> str: ...
    @property
    def dst_ip(self) -> str: ...
    @property
    def src_port(self) -> int: ...
    @property
    def dst_port(self) -> int: ...
    @property
    def direction(self) -> str: ...
    @property
    def verdict(self) -> str: ...
    @property
    def rule_id(self) -> int | None: ...
    @property
    def ifindex(self) -> int: ...


@dataclass
class ChangeResult:
    """The outcome of a change: the diff, and for a dry run the sessions it would re-judge.

    Groups: `groups_added`/`groups_removed` by name, `groups_changed` the names whose members
    differ. A change of one group (`set_group`, `delete_group`, `add_members`,
    `remove_members`) also fills `group` (its name), `group_created`/`group_deleted`,
    `members_added`/`members_removed` (canonical members that went in or out),
    `members_unchanged` (members given that changed nothing: already in the group for an add,
    not in it for a remove), `member_count` (after the change) and `group_rules` (the
    rule_ids using the group); `group_to_api` is the answer of the group routes.
    """

    generation: int
    added: list[Rule] = field(default_factory=list)
    removed: list[Rule] = field(default_factory=list)
    changed: list[tuple[Rule, Rule]] = field(default_factory=list)
    default_action_changed: bool = False
    groups_added: list[str] = field(default_factory=list)
    groups_removed: list[str] = field(default_factory=list)
    groups_changed: list[str] = field(default_factory=list)
    dry_run: bool = False
    sessions_checked: int = 0
    sessions_changing: int = 0
    group: str | None = None
    group_created: bool = False
    group_deleted: bool = False
    members_added: list[str] = field(default_factory=list)
    members_removed: list[str] = field(default_factory=list)
    members_unchanged: list[str] = field(default_factory=list)
    member_count: int = 0
    group_rules: list[int] = field(default_factory=list)
    # A dry run's: the failsafe entries that pass before any rule, whatever the change.
    failsafe: list[str] = field(default_factory=list)
    pending: PendingChange | None = None

    def with_pending(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` with `pending` (generation, deadline) when this change waits for its
        confirmation."""
        if self.pending is not None:
            body["pending"] = self.pending.to_api()
        return body

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dry_run": self.dry_run,
            "generation": self.generation,
            "added": [r.to_api() for r in self.added],
            "removed": [r.to_api() for r in self.removed],
            "changed": [{"before": a.to_api(), "after": b.to_api()} for a, b in self.changed],
            "default_action_changed": self.default_action_changed,
            "groups_added": self.groups_added,
            "groups_removed": self.groups_removed,
            "groups_changed": self.groups_changed,
        }
        if self.dry_run:
            out["sessions_checked"] = self.sessions_checked
            out["sessions_changing_verdict"] = self.sessions_changing
            out["failsafe"] = self.failsafe
        return self.with_pending(out)

    def group_to_api(self) -> dict[str, Any]:
        """The answer of a group write (docs/contract.md §5, the GroupChange object)."""
        out: dict[str, Any] = {
            "dry_run": self.dry_run,
            "generation": self.generation,
            "name": self.group,
            "created": self.group_created,
            "deleted": self.group_deleted,
            "members_added": self.members_added,
            "members_removed": self.members_removed,
            "members_unchanged": self.members_unchanged,
            "member_count": self.member_count,
            "rules": self.group_rules,
        }
        if self.dry_run:
            out["sessions_checked"] = self.sessions_checked
            out["sessions_changing_verdict"] = self.sessions_changing
            out["failsafe"] = self.failsafe
        return self.with_pending(out)


def diff_policies(old: PolicySet, new: PolicySet, generation: int) -> ChangeResult:
    """Rules added, removed and changed (by rule_id), and groups added, removed and changed
    (by name), from old to new."""
    before = {r.rule_id: r for r in old.policies}
    after = {r.rule_id: r for r in new.policies}
    old_groups, new_groups = old.groups, new.groups
    return ChangeResult(
        generation=generation,
        added=[r for rid, r in after.items() if rid not in before],
        removed=[r for rid, r in before.items() if rid not in after],
        changed=[(before[k], r) for k, r in after.items() if k in before and before[k] != r],
        default_action_changed=old.default_action != new.default_action,
        groups_added=[n for n in new_groups if n not in old_groups],
        groups_removed=[n for n in old_groups if n not in new_groups],
        groups_changed=[
            n
            for n, g in new_groups.items()
            if n in old_groups and old_groups[n] is not g and old_groups[n] != g
        ],
    )


def sessions_changing(
    sessions: Iterable[LiveSession],
    new: PolicySet,
    failsafe: tuple[FailsafeRule, ...] = (),
    staged_all: bool = False,
) -> tuple[int, int]:
    """(sessions checked, sessions whose verdict or rule the new set would change).

    Each session is judged by the reference model as its first packet was, with the agent's
    failsafe entries and policy mode (the enforced view: what the kernel would do).
    """
    checked = changing = 0
    for s in sessions:
        checked += 1
        pkt = Packet(
            family=s.family,
            src=ip_address(s.src_ip),
            dst=ip_address(s.dst_ip),
            proto=s.protocol,
            sport=s.src_port if s.protocol in (6, 17) else 0,
            dport=s.dst_port if s.protocol in (6, 17) else 0,
            direction="egress" if s.direction == "egress" else "ingress",
            ifindex=s.ifindex,
        )
        d = judge(new, pkt, failsafe, staged_all)
        rid = d.rule.rule_id if d.rule is not None else None
        if VERDICT_NAMES.get(d.verdict) != s.verdict or rid != s.rule_id:
            changing += 1
    return checked, changing


class _Unchanged(Exception):
    """An edit that leaves the set as it is (`PolicyStore.change_unless_same`)."""


def _check_name(name: str) -> None:
    try:
        check_group_name(name)
    except ValueError as e:
        raise StoreError(str(e)) from None


def _group_of(policy: PolicySet, name: str) -> Group:
    group = policy.groups.get(name)
    if group is None:
        raise GroupNotFound(f"no group named {name!r}")
    return group


def _check_groups(rule: Rule, groups: Mapping[str, Group]) -> None:
    """A rule may only name groups the set has (400 otherwise)."""
    for end, name in (("src_group", rule.src_group), ("dst_group", rule.dst_group)):
        if name is not None and name not in groups:
            raise StoreError(
                f"rule_id {rule.rule_id}: {end}: {unknown_group_message(name, dict(groups))}"
            )


def _rules_text(rule_ids: list[int]) -> str:
    shown = ", ".join(str(r) for r in rule_ids[:20])
    more = f" and {len(rule_ids) - 20} more" if len(rule_ids) > 20 else ""
    return f"rule{'s' if len(rule_ids) > 1 else ''} {shown}{more}"


_MEMBERS_OFF_LOOP = 2000  # parse longer member lists in a worker thread


async def _canonical_members(members: Sequence[str]) -> tuple[str, ...]:
    """The members' canonical texts; StoreError (400) naming each bad one."""
    try:
        if len(members) > _MEMBERS_OFF_LOOP:
            return await asyncio.to_thread(parse_members, list(members))
        return parse_members(list(members))
    except ValueError as e:
        raise StoreError("\n".join(f"members{line}" for line in str(e).split("\n"))) from None


Applier = Callable[[PolicySet, int | None], int]
"""Switch the kernel to a set (at least at the given generation); returns the generation."""


def persisted_document(state_dir: Path) -> dict[str, Any] | None:
    """The applied set as the state dir holds it (snapshot and journal), as a policy document
    with its `generation`; None when it holds none (for tools and tests)."""
    found = PolicyStore(state_dir, lambda _p, _g: 0).read_persisted()
    if found is None:
        return None
    policy, generation = found
    return dict(policy.to_api(), generation=generation)


class EditApplier(Protocol):
    """Switch the kernel by one edit made against `state` (the set before it); returns the
    generation. May fall back to a whole-set apply itself."""

    def __call__(self, edit: Edit, state: PolicyState) -> int: ...


class PolicyStore:
    """Owns the applied set. All writes go through `change`, one at a time. `applier` takes
    whole sets; `edit_applier`, when given, single edits (else they go as whole sets)."""

    def __init__(
        self,
        state_dir: Path,
        applier: Applier,
        sessions: Callable[[], Iterable[LiveSession]] = lambda: (),
        edit_applier: EditApplier | None = None,
        failsafe: tuple[FailsafeRule, ...] = (),
        staged_all: bool = False,
    ) -> None:
        self.state_dir = state_dir
        # dry runs judge sessions as the kernel does: failsafe first, in the agent's policy mode
        self.failsafe = failsafe
        self.staged_all = staged_all
        self._apply = applier
        self._apply_edit = edit_applier
        self._sessions = sessions
        self._lock = asyncio.Lock()
        self.state = PolicyState(DefaultAction.ALLOW, {})
        self.generation = 0
        self.journal = Journal(state_dir)
        # The change waiting for its confirmation (contract §6); set on each change of it.
        self.pending: PendingChange | None = None
        self.pending_changed = asyncio.Event()
        # In fleet mode: what decides the policy (local writes are refused with it).
        self.managed_by: str | None = None
        # Changes the kernel (or the classifier's compiler) or the disk refused since start
        # (`microseg_policy_apply_failures_total`); refusals of a bad request are not counted.
        self.apply_failures = 0

    @property
    def path(self) -> Path:
        return self.journal.path

    @property
    def policy(self) -> PolicySet:
        """The applied set (a view built once per change)."""
        return self.state.policy_set()

    def rule(self, rule_id: int) -> Rule | None:
        """The applied rule with this id, or None."""
        return self.state.get(rule_id)

    def read_persisted(self) -> tuple[PolicySet, int] | None:
        """The set and generation on disk (the snapshot and the journal after it), or None
        when the state dir holds none.

        A damaged file is an error (PolicyError): the agent must not silently start empty.
        """
        try:
            found = read_state(self.state_dir)
            if found is None:
                return None
            doc, generation, records = found
            policy = parse_policy_document(doc, source=str(self.path))
            if not records:
                return policy, generation
            state = PolicyState.of(policy)
            for rec in records:
                replay(state, rec)
                generation = int(rec["generation"])
        except JournalError as e:
            raise PolicyError([str(e)]) from e
        except (ValueError, KeyError, TypeError) as e:
            raise PolicyError([f"{self.state_dir}: unreadable policy journal: {e}"]) from e
        return state.policy_set(), generation

    def _persist(self, policy: PolicySet, generation: int) -> None:
        self.journal.snapshot(policy.to_api(), generation)

    def restore(self, policy: PolicySet, generation: int) -> int:
        """At start: enforce `policy` (from disk or the seeding file) and persist it."""
        gen = self._apply(policy, generation)
        self._persist(policy, gen)
        self.state, self.generation = PolicyState.of(policy), gen
        return gen

    # ---- changes ------------------------------------------------------------------------

    async def add(
        self, rule: Rule, actor: str, dry_run: bool = False, opts: WriteOptions | None = None
    ) -> ChangeResult:
        def edit(cur: PolicyState) -> Edit:
            if cur.get(rule.rule_id) is not None:
                raise DuplicateRule(f"rule_id {rule.rule_id} already exists")
            _check_groups(rule, cur.groups)
            return Edit(f"add rule {rule.rule_id}", added=[rule], record=_rule_record("add", rule))

        return await self.edit(edit, actor, dry_run, opts)

    async def update(
        self, rule: Rule, actor: str, dry_run: bool = False, opts: WriteOptions | None = None
    ) -> ChangeResult:
        def edit(cur: PolicyState) -> Edit:
            old = cur.get(rule.rule_id)
            if old is None:
                raise RuleNotFound(f"no rule with rule_id {rule.rule_id}")
            _check_groups(rule, cur.groups)
            return Edit(
                f"update rule {rule.rule_id}",
                changed=[(old, rule)],
                record=_rule_record("update", rule),
            )

        return await self.edit(edit, actor, dry_run, opts)

    async def promote(
        self,
        rule_ids: Sequence[int],
        actor: str,
        dry_run: bool = False,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        """Staged rules made enforced, all in one generation (contract §6). RuleNotFound for
        an unknown rule_id, NotStaged for a rule that is not staged: then nothing changes."""

        def edit(cur: PolicyState) -> Edit:
            changed = []
            for rid in dict.fromkeys(rule_ids):
                old = cur.get(rid)
                if old is None:
                    raise RuleNotFound(f"no rule with rule_id {rid}")
                if not old.staged:
                    raise NotStaged(f"rule {rid} is not staged: there is nothing to promote")
                changed.append((old, enforced(old)))
            ids = [new.rule_id for _, new in changed]
            return Edit(
                f"promote rule{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}",
                changed=changed,
                record={"op": "promote", "rule_ids": ids},
            )

        return await self.edit(edit, actor, dry_run, opts)

    async def delete(
        self, rule_id: int, actor: str, dry_run: bool = False, opts: WriteOptions | None = None
    ) -> ChangeResult:
        def edit(cur: PolicyState) -> Edit:
            old = cur.get(rule_id)
            if old is None:
                raise RuleNotFound(f"no rule with rule_id {rule_id}")
            return Edit(
                f"delete rule {rule_id}",
                removed=[old],
                record={"op": "delete", "rule_id": rule_id},
            )

        return await self.edit(edit, actor, dry_run, opts)

    # ---- groups (docs/contract.md §5) ----------------------------------------------------

    async def set_group(
        self,
        name: str,
        group: Group,
        actor: str,
        dry_run: bool = False,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        """Create group `name`, or replace its members."""
        _check_name(name)
        facts: dict[str, Any] = {}

        def edit(cur: PolicyState) -> Edit:
            old = cur.groups.get(name)
            before = set(old.members) if old is not None else set()
            after = set(group.members)
            added = [m for m in group.members if m not in before]
            removed = [m for m in old.members if m not in after] if old else []
            facts.update(created=old is None, added=added, removed=removed)
            return Edit(
                what,
                groups={name: (old or Group(members=()), group, added, removed)},
                record={"op": "set_group", "name": name, "members": list(group.members)},
            )

        what = f"set group {name} ({len(group.members)} members)"
        result = await self.edit(edit, actor, dry_run, opts)
        result.group_created = facts["created"]
        result.members_added, result.members_removed = facts["added"], facts["removed"]
        if facts["created"]:
            result.groups_added = [name]
        elif facts["added"] or facts["removed"]:
            result.groups_changed = [name]
        return self._group_facts(result, name, len(group.members))

    async def delete_group(
        self, name: str, actor: str, dry_run: bool = False, opts: WriteOptions | None = None
    ) -> ChangeResult:
        """Delete group `name`: refused (GroupInUse) while a rule names it."""
        _check_name(name)
        facts: dict[str, Any] = {}

        def edit(cur: PolicySet) -> PolicySet:
            old = _group_of(cur, name)
            users = cur.rules_using(name)
            if users:
                raise GroupInUse(
                    f"group {name!r} is used by {_rules_text(users)}: change or delete "
                    "those rules first"
                )
            facts["removed"] = list(old.members)
            groups = {n: g for n, g in cur.groups.items() if n != name}
            return cur.model_copy(update={"groups": groups})

        result = await self.change(edit, actor, f"delete group {name}", dry_run, opts)
        result.group_deleted = True
        result.members_removed = facts["removed"]
        return self._group_facts(result, name, 0)

    async def add_members(
        self,
        name: str,
        members: Sequence[str],
        actor: str,
        dry_run: bool = False,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        """Add members to group `name`. Idempotent: members already in it change nothing
        (`members_unchanged`); with none new the set is not rewritten (no new generation).
        Only the entries of the new members are written."""
        return await self._members(name, members, actor, dry_run, True, opts)

    async def remove_members(
        self,
        name: str,
        members: Sequence[str],
        actor: str,
        dry_run: bool = False,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        """Remove members from group `name`. Idempotent: members not in it change nothing
        (`members_unchanged`); with none removed the set is not rewritten (no new generation).
        Only the entries of the members removed are deleted."""
        return await self._members(name, members, actor, dry_run, False, opts)

    async def _members(
        self,
        name: str,
        members: Sequence[str],
        actor: str,
        dry_run: bool,
        adding: bool,
        opts: WriteOptions | None,
    ) -> ChangeResult:
        _check_name(name)
        given = await _canonical_members(members)
        facts: dict[str, Any] = {}

        def edit(cur: PolicyState) -> Edit:
            old = cur.groups.get(name)
            if old is None:
                raise GroupNotFound(f"no group named {name!r}")
            if adding:
                new, changed, unchanged = old.with_members(given)
            else:
                new, changed, unchanged = old.without_members(given)
            facts.update(changed=changed, unchanged=unchanged, count=len(new.members))
            if not changed:
                raise _Unchanged
            op = "add_members" if adding else "remove_members"
            return Edit(
                f"{'add' if adding else 'remove'} {len(changed)} members"
                f" {'to' if adding else 'from'} group {name}",
                groups={name: (old, new, changed if adding else [], [] if adding else changed)},
                record={"op": op, "name": name, "members": changed},
            )

        try:
            result = await self.edit(edit, actor, dry_run, opts)
        except _Unchanged:
            result = ChangeResult(generation=self.generation, dry_run=dry_run)
        if adding:
            result.members_added = facts.get("changed", [])
        else:
            result.members_removed = facts.get("changed", [])
        result.members_unchanged = facts.get("unchanged", [])
        if facts.get("changed"):
            result.groups_changed = [name]
        return self._group_facts(result, name, facts.get("count", 0))

    def _group_facts(self, result: ChangeResult, name: str, count: int) -> ChangeResult:
        result.group = name
        result.member_count = count
        result.group_rules = [r.rule_id for r in self.state.users(name)]
        return result

    async def change_unless_same(
        self,
        edit: Callable[[PolicySet], PolicySet],
        actor: str,
        what: str,
        dry_run: bool,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        """`change`, except that an edit returning the set it was given changes nothing: the
        answer is an empty diff at the current generation (no session to check), nothing is
        applied or logged."""

        def checked(cur: PolicySet) -> PolicySet:
            new = edit(cur)
            if new is cur:
                raise _Unchanged
            return new

        try:
            return await self.change(checked, actor, what, dry_run, opts)
        except _Unchanged:
            return ChangeResult(generation=self.generation, dry_run=dry_run)

    async def replace(
        self,
        policy: PolicySet,
        actor: str,
        dry_run: bool = False,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        return await self.change(
            lambda _cur: policy, actor, f"replace set ({len(policy.policies)} rules)", dry_run, opts
        )

    async def sync(
        self, policy: PolicySet, actor: str, what: str, opts: WriteOptions | None = None
    ) -> ChangeResult:
        """Move the applied set to `policy` by the smallest edit that gets there (streamer.
        policy.state.diff_edit: the changed rules, or one group's members, in place; else a
        whole-set replace). The same set changes nothing: the answer is the current
        generation."""

        def make(cur: PolicyState) -> Edit:
            e = diff_edit(cur, policy, what)
            if e is None:
                return Edit(what, whole=policy)
            if is_empty(e):
                raise _Unchanged
            return e

        try:
            return await self.edit(make, actor, False, opts)
        except _Unchanged:
            return ChangeResult(generation=self.generation)

    async def change(
        self,
        edit: Callable[[PolicySet], PolicySet],
        actor: str,
        what: str,
        dry_run: bool,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        """A whole-set edit: `edit` gets the applied set and returns the new one."""

        def whole(cur: PolicyState) -> Edit:
            new = edit(cur.policy_set())
            return Edit(what, whole=new)

        return await self.edit(whole, actor, dry_run, opts)

    async def edit(
        self,
        make: Callable[[PolicyState], Edit],
        actor: str,
        dry_run: bool,
        opts: WriteOptions | None = None,
    ) -> ChangeResult:
        """Serialize, make the edit against the applied state, then enforce and persist it
        (or, dry, only describe it). While a change waits for its confirmation no other is
        made (PendingConflict); dry runs are answered."""
        opts = opts or WriteOptions()
        if self.managed_by is not None and not dry_run and not opts.fleet:
            raise Managed(self._managed_message())
        async with self._lock:
            pending = self.pending
            if pending is not None and not dry_run:
                raise PendingConflict(
                    f"generation {pending.generation} ({pending.what}) waits for its "
                    f"confirmation until {rfc3339(pending.deadline)}: confirm it (POST "
                    "/api/v1/policies/confirm) or let it be reverted, then try again"
                )
            return await self._edit(make, actor, dry_run, opts)

    async def _edit(
        self,
        make: Callable[[PolicyState], Edit],
        actor: str,
        dry_run: bool,
        opts: WriteOptions,
        reverting: PendingChange | None = None,
    ) -> ChangeResult:
        state, old_gen = self.state, self.generation
        e = make(state)
        if e.whole is not None:
            result = diff_policies(state.policy_set(), e.whole, old_gen)
        else:
            result = ChangeResult(
                generation=old_gen,
                added=list(e.added),
                removed=list(e.removed),
                changed=[(a, b) for a, b in e.changed if a != b],
                default_action_changed=e.default_action is not None
                and e.default_action != state.default_action,
            )
        if dry_run:
            result.dry_run = True
            new = state.after(e)
            checked, changing = await asyncio.to_thread(
                sessions_changing, list(self._sessions()), new, self.failsafe, self.staged_all
            )
            result.sessions_checked, result.sessions_changing = checked, changing
            result.failsafe = [str(f) for f in self.failsafe]
            return result
        pend: PendingChange | None = None
        if opts.confirm_within is not None:
            now = time.time()
            pend = PendingChange(
                generation=0,  # known once the kernel took it
                base_generation=old_gen,
                deadline=now + opts.confirm_within,
                confirm_within=opts.confirm_within,
                actor=actor,
                what=e.what,
                previous=state.policy_set(),
                applied_at=now,
            )
        gen = await asyncio.to_thread(self._commit, e, state, opts.check, pend, reverting)
        # The state moves here, on the loop, where its readers are.
        state.apply(e)
        self.generation = gen
        log.info("%s by %s: generation %d", e.what, actor, gen)
        extra: dict[str, Any] = {}
        if pend is not None:
            self._set_pending(pend)
            extra["confirm_by"] = rfc3339(pend.deadline)
            log.info("generation %d reverts at %s unless confirmed", gen, rfc3339(pend.deadline))
        elif reverting is not None:
            self._set_pending(None)
            extra["reverted"] = reverting.generation
        self._audit(actor, e.what, gen, extra)
        result.generation = gen
        result.pending = pend
        if e.whole is None and self.journal.due():
            # The view is taken now: the state moves on while the snapshot is written.
            self.journal.compact(state.policy_set().to_api, gen)
        return result

    def _commit(
        self,
        e: Edit,
        state: PolicyState,
        check: Callable[[PolicySet], None] | None = None,
        pend: PendingChange | None = None,
        reverting: PendingChange | None = None,
    ) -> int:
        """`check` the new set, then kernel, then disk (both or neither); returns the
        generation. A change to confirm (`pend`) is recorded with what it replaced before the
        change is saved; the record of a change being reverted (`reverting`) is removed after
        the revert is saved."""
        whole = e.whole
        if check is not None:
            check(state.after(e))
        try:
            if whole is not None:
                gen = self._apply(whole, None)
            elif self._apply_edit is not None:
                gen = self._apply_edit(e, state)
            else:
                gen = self._apply(state.after(e), None)
        except StoreError:
            # The applier's own refusal (a set the classifier cannot hold): still a failure.
            self.apply_failures += 1
            raise
        except Exception as exc:
            self.apply_failures += 1
            raise ApplyFailed(f"the kernel refused the policy, nothing changed: {exc}") from exc
        try:
            if pend is not None:
                pend.generation = gen
                write_pending(self.state_dir, pend)
            if whole is not None:
                self._persist(whole, gen)
            else:
                self.journal.append(dict(e.record, generation=gen))
        except OSError as exc:
            # The disk said no: put the kernel back so both stay on the old set.
            self.apply_failures += 1
            self._apply(state.policy_set(), None)
            if pend is not None:
                with contextlib.suppress(OSError):
                    clear_pending(self.state_dir)
            raise ApplyFailed(f"saving the policy failed, nothing changed: {exc}") from exc
        if reverting is not None:
            try:
                clear_pending(self.state_dir)
            except OSError as exc:
                # Harmless at the next start: the saved set is newer than the pending change.
                log.warning("could not remove the pending change's record: %s", exc)
        return gen

    # ---- confirm or revert (contract §6) --------------------------------------------------

    def _set_pending(self, pending: PendingChange | None) -> None:
        self.pending = pending
        self.pending_changed.set()

    def _managed_message(self) -> str:
        return (
            f"this agent's policy is managed by the fleet ({self.managed_by}): change it with "
            "`microseg fleet apply`; reads and dry runs work here"
        )

    async def confirm(self, generation: int, actor: str) -> PendingChange:
        """Keep the pending change of `generation`: NotPending when it is not the one
        waiting (none is, another is, or it was reverted)."""
        if self.managed_by is not None:
            raise Managed(self._managed_message())
        async with self._lock:
            pending = self.pending
            if pending is None:
                raise NotPending(f"generation {generation} is not pending: no change is")
            if pending.generation != generation:
                raise NotPending(
                    f"generation {generation} is not pending: generation "
                    f"{pending.generation} is (until {rfc3339(pending.deadline)})"
                )
            try:
                await asyncio.to_thread(clear_pending, self.state_dir)
            except OSError as exc:
                self.apply_failures += 1
                raise ApplyFailed(
                    f"recording the confirmation failed; generation {generation} is still "
                    f"pending: {exc}"
                ) from exc
            self._set_pending(None)
            log.info("generation %d confirmed by %s", generation, actor)
            self._audit(actor, f"confirm generation {generation}", generation, {})
            return pending

    async def revert(self, pending: PendingChange, actor: str = "revert") -> ChangeResult | None:
        """Put back the set `pending` replaced, as a new generation: None when that change is
        no longer pending (confirmed meanwhile). StoreError when the set cannot be applied:
        the change then stays in force and is no longer pending (kept, not retried)."""
        async with self._lock:
            if self.pending is not pending:
                return None
            what = f"revert generation {pending.generation} ({pending.what})"
            try:
                return await self._edit(
                    lambda _cur: Edit(what, whole=pending.previous),
                    actor,
                    False,
                    WriteOptions(),
                    reverting=pending,
                )
            except StoreError:
                self._set_pending(None)
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(clear_pending, self.state_dir)
                raise

    def adopt_pending(self, saved_generation: int | None) -> PendingChange | None:
        """At start, after `restore`: the change the state dir says is pending, if the set
        restored (saved at `saved_generation`; None: nothing was saved) is that change's.
        Anything else on disk is stale (the change was never saved, or it was reverted
        already) and is removed. A damaged record is set aside and logged (PendingError)."""
        try:
            found = read_pending(self.state_dir)
        except PendingError:
            set_aside(self.state_dir)
            raise
        if found is None:
            return None
        if saved_generation != found.generation:
            log.info(
                "the pending record of generation %d is stale (the saved set is generation "
                "%s): nothing to revert",
                found.generation,
                saved_generation,
            )
            with contextlib.suppress(OSError):
                clear_pending(self.state_dir)
            return None
        # The kernel may have given the restored set another number.
        found.generation = self.generation
        self._set_pending(found)
        return found

    def close(self) -> None:
        """Finish a snapshot being written and close the journal."""
        self.journal.close()

    def _audit(self, actor: str, what: str, generation: int, extra: dict[str, Any]) -> None:
        try:
            line = orjson.dumps(
                {
                    "time": time.time(),
                    "actor": actor,
                    "change": what,
                    "generation": generation,
                    **extra,
                }
            )
            with (self.state_dir / CHANGES_FILE).open("ab") as f:
                f.write(line + b"\n")
        except OSError as e:
            log.warning("could not append to the change log: %s", e)


def _rule_record(op: str, rule: Rule) -> dict[str, Any]:
    return {"op": op, "rule": rule.to_api()}
