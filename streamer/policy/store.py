"""The policy store: the applied set and its generation, in the kernel and on disk, never apart.

In: whole sets or single-rule changes (from the API, SIGHUP, `microseg policy load`). Out: the
new set enforced in the kernel *and* persisted in the state dir before the call returns, or
neither (an error, with kernel and disk as they were). Writes are serialized. Dry runs compute
the diff and the live sessions whose verdict would change, and apply nothing.

A single-rule change costs what it touches: the state moves in place (streamer.policy.state),
the kernel takes only the entries it changes (an `EditApplier`), and the disk one journal line
(streamer.policy.journal); a whole set is compiled and written whole, and becomes the new
snapshot. The kernel is switched first and the disk second; if the disk write fails the kernel
is switched back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol

import orjson

from streamer.datapath.layout import VERDICT_NAMES
from streamer.datapath.reference import Packet, judge
from streamer.policy.journal import Journal, JournalError, read_state
from streamer.policy.model import PolicyError, PolicySet, Rule, parse_policy_document
from streamer.policy.state import Edit, PolicyState, replay
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


class ApplyFailed(StoreError):
    """The kernel or the disk refused the change; nothing was changed."""

    status = 503
    code = "apply_failed"


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
    """The outcome of a change: the diff, and for a dry run the sessions it would re-judge."""

    generation: int
    added: list[Rule] = field(default_factory=list)
    removed: list[Rule] = field(default_factory=list)
    changed: list[tuple[Rule, Rule]] = field(default_factory=list)
    default_action_changed: bool = False
    dry_run: bool = False
    sessions_checked: int = 0
    sessions_changing: int = 0

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dry_run": self.dry_run,
            "generation": self.generation,
            "added": [r.to_api() for r in self.added],
            "removed": [r.to_api() for r in self.removed],
            "changed": [{"before": a.to_api(), "after": b.to_api()} for a, b in self.changed],
            "default_action_changed": self.default_action_changed,
        }
        if self.dry_run:
            out["sessions_checked"] = self.sessions_checked
            out["sessions_changing_verdict"] = self.sessions_changing
        return out


def diff_policies(old: PolicySet, new: PolicySet, generation: int) -> ChangeResult:
    """Rules added, removed and changed (by rule_id) from old to new."""
    before = {r.rule_id: r for r in old.policies}
    after = {r.rule_id: r for r in new.policies}
    return ChangeResult(
        generation=generation,
        added=[r for rid, r in after.items() if rid not in before],
        removed=[r for rid, r in before.items() if rid not in after],
        changed=[(before[k], r) for k, r in after.items() if k in before and before[k] != r],
        default_action_changed=old.default_action != new.default_action,
    )


def sessions_changing(sessions: Iterable[LiveSession], new: PolicySet) -> tuple[int, int]:
    """(sessions checked, sessions whose verdict or rule the new set would change).

    Each session is judged by the reference model as its first packet was.
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
        d = judge(new, pkt)
        rid = d.rule.rule_id if d.rule is not None else None
        if VERDICT_NAMES.get(d.verdict) != s.verdict or rid != s.rule_id:
            changing += 1
    return checked, changing


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
    ) -> None:
        self.state_dir = state_dir
        self._apply = applier
        self._apply_edit = edit_applier
        self._sessions = sessions
        self._lock = asyncio.Lock()
        self.state = PolicyState(DefaultAction.ALLOW, {})
        self.generation = 0
        self.journal = Journal(state_dir)

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

    async def add(self, rule: Rule, actor: str, dry_run: bool = False) -> ChangeResult:
        def edit(cur: PolicyState) -> Edit:
            if cur.get(rule.rule_id) is not None:
                raise DuplicateRule(f"rule_id {rule.rule_id} already exists")
            return Edit(f"add rule {rule.rule_id}", added=[rule], record=_rule_record("add", rule))

        return await self.edit(edit, actor, dry_run)

    async def update(self, rule: Rule, actor: str, dry_run: bool = False) -> ChangeResult:
        def edit(cur: PolicyState) -> Edit:
            old = cur.get(rule.rule_id)
            if old is None:
                raise RuleNotFound(f"no rule with rule_id {rule.rule_id}")
            return Edit(
                f"update rule {rule.rule_id}",
                changed=[(old, rule)],
                record=_rule_record("update", rule),
            )

        return await self.edit(edit, actor, dry_run)

    async def delete(self, rule_id: int, actor: str, dry_run: bool = False) -> ChangeResult:
        def edit(cur: PolicyState) -> Edit:
            old = cur.get(rule_id)
            if old is None:
                raise RuleNotFound(f"no rule with rule_id {rule_id}")
            return Edit(
                f"delete rule {rule_id}",
                removed=[old],
                record={"op": "delete", "rule_id": rule_id},
            )

        return await self.edit(edit, actor, dry_run)

    async def replace(self, policy: PolicySet, actor: str, dry_run: bool = False) -> ChangeResult:
        return await self.change(
            lambda _cur: policy, actor, f"replace set ({len(policy.policies)} rules)", dry_run
        )

    async def change(
        self, edit: Callable[[PolicySet], PolicySet], actor: str, what: str, dry_run: bool
    ) -> ChangeResult:
        """A whole-set edit: `edit` gets the applied set and returns the new one."""

        def whole(cur: PolicyState) -> Edit:
            new = edit(cur.policy_set())
            return Edit(what, whole=new)

        return await self.edit(whole, actor, dry_run)

    async def edit(
        self, make: Callable[[PolicyState], Edit], actor: str, dry_run: bool
    ) -> ChangeResult:
        """Serialize, make the edit against the applied state, then enforce and persist it
        (or, dry, only describe it)."""
        async with self._lock:
            state, old_gen = self.state, self.generation
            e = make(state)
            if e.whole is not None:
                result = diff_policies(state.policy_set(), e.whole, old_gen)
                e.added, e.removed = result.added, result.removed
                e.changed = result.changed
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
                    sessions_changing, list(self._sessions()), new
                )
                result.sessions_checked, result.sessions_changing = checked, changing
                return result
            gen = await asyncio.to_thread(self._commit, e, state)
            # The state moves here, on the loop, where its readers are.
            state.apply(e)
            self.generation = gen
            log.info("%s by %s: generation %d", e.what, actor, gen)
            self._audit(actor, e.what, gen)
            result.generation = gen
            if e.whole is None:
                self.journal.compact_if_due(self._snapshot_of(state.policy_set()), gen)
            return result

    @staticmethod
    def _snapshot_of(policy: PolicySet) -> Callable[[], dict[str, Any]]:
        return policy.to_api

    def _commit(self, e: Edit, state: PolicyState) -> int:
        """Kernel, then disk (both or neither); returns the generation."""
        whole = e.whole
        try:
            if whole is not None:
                gen = self._apply(whole, None)
            elif self._apply_edit is not None:
                gen = self._apply_edit(e, state)
            else:
                gen = self._apply(state.after(e), None)
        except StoreError:
            raise
        except Exception as exc:
            raise ApplyFailed(f"the kernel refused the policy, nothing changed: {exc}") from exc
        try:
            if whole is not None:
                self._persist(whole, gen)
            else:
                self.journal.append(dict(e.record, generation=gen))
        except OSError as exc:
            # The disk said no: put the kernel back so both stay on the old set.
            self._apply(state.policy_set(), None)
            raise ApplyFailed(f"saving the policy failed, nothing changed: {exc}") from exc
        return gen

    def close(self) -> None:
        """Finish a snapshot being written and close the journal."""
        self.journal.close()

    def _audit(self, actor: str, what: str, generation: int) -> None:
        try:
            line = orjson.dumps(
                {"time": time.time(), "actor": actor, "change": what, "generation": generation}
            )
            with (self.state_dir / CHANGES_FILE).open("ab") as f:
                f.write(line + b"\n")
        except OSError as e:
            log.warning("could not append to the change log: %s", e)


def _rule_record(op: str, rule: Rule) -> dict[str, Any]:
    return {"op": op, "rule": rule.to_api()}
