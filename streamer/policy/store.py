"""The policy store: the applied set and its generation, in the kernel and on disk, never apart.

In: whole sets or single-rule changes (from the API, SIGHUP, `microseg policy load`). Out: the
new set enforced in the kernel *and* persisted in <state-dir>/policy.json before the call
returns, or neither (an error, with kernel and disk as they were). Writes are serialized.
Dry runs compute the diff and the live sessions whose verdict would change, and apply nothing.

Disk writes are atomic (temporary file, fsync, rename, fsync of the directory), so a crash at
any moment leaves the old or the new set on disk, whole. The kernel is switched first and the
disk second; if the disk write fails the kernel is switched back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol

import orjson

from streamer.datapath.layout import VERDICT_NAMES
from streamer.datapath.reference import Packet, judge
from streamer.policy.model import PolicyError, PolicySet, Rule, parse_policy_document

log = logging.getLogger("microseg.store")

STATE_FILE = "policy.json"
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


Applier = Callable[[PolicySet, int | None], int]
"""Switch the kernel to a set (at least at the given generation); returns the generation."""


class PolicyStore:
    """Owns the applied set. All writes go through `change`, one at a time."""

    def __init__(
        self,
        state_dir: Path,
        applier: Applier,
        sessions: Callable[[], Iterable[LiveSession]] = lambda: (),
    ) -> None:
        self.state_dir = state_dir
        self._apply = applier
        self._sessions = sessions
        self._lock = asyncio.Lock()
        self.policy = PolicySet()
        self.generation = 0

    @property
    def path(self) -> Path:
        return self.state_dir / STATE_FILE

    def read_persisted(self) -> tuple[PolicySet, int] | None:
        """The set and generation on disk, or None when the state dir holds none.

        A damaged file is an error (PolicyError): the agent must not silently start empty.
        """
        if not self.path.exists():
            return None
        try:
            doc = orjson.loads(self.path.read_bytes())
            generation = int(doc.pop("generation", 0))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise PolicyError([f"{self.path}: unreadable policy state: {e}"]) from e
        return parse_policy_document(doc, source=str(self.path)), generation

    def _persist(self, policy: PolicySet, generation: int) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        doc = policy.to_api()
        doc["generation"] = generation
        _write_atomic(self.path, orjson.dumps(doc))

    def restore(self, policy: PolicySet, generation: int) -> int:
        """At start: enforce `policy` (from disk or the seeding file) and persist it."""
        gen = self._apply(policy, generation)
        self._persist(policy, gen)
        self.policy, self.generation = policy, gen
        return gen

    # ---- changes ------------------------------------------------------------------------

    async def add(self, rule: Rule, actor: str, dry_run: bool = False) -> ChangeResult:
        def edit(cur: PolicySet) -> PolicySet:
            if cur.get(rule.rule_id) is not None:
                raise DuplicateRule(f"rule_id {rule.rule_id} already exists")
            return cur.model_copy(update={"policies": [*cur.policies, rule]})

        return await self.change(edit, actor, f"add rule {rule.rule_id}", dry_run)

    async def update(self, rule: Rule, actor: str, dry_run: bool = False) -> ChangeResult:
        def edit(cur: PolicySet) -> PolicySet:
            if cur.get(rule.rule_id) is None:
                raise RuleNotFound(f"no rule with rule_id {rule.rule_id}")
            rules = [rule if r.rule_id == rule.rule_id else r for r in cur.policies]
            return cur.model_copy(update={"policies": rules})

        return await self.change(edit, actor, f"update rule {rule.rule_id}", dry_run)

    async def delete(self, rule_id: int, actor: str, dry_run: bool = False) -> ChangeResult:
        def edit(cur: PolicySet) -> PolicySet:
            if cur.get(rule_id) is None:
                raise RuleNotFound(f"no rule with rule_id {rule_id}")
            rules = [r for r in cur.policies if r.rule_id != rule_id]
            return cur.model_copy(update={"policies": rules})

        return await self.change(edit, actor, f"delete rule {rule_id}", dry_run)

    async def replace(self, policy: PolicySet, actor: str, dry_run: bool = False) -> ChangeResult:
        return await self.change(
            lambda _cur: policy, actor, f"replace set ({len(policy.policies)} rules)", dry_run
        )

    async def change(
        self, edit: Callable[[PolicySet], PolicySet], actor: str, what: str, dry_run: bool
    ) -> ChangeResult:
        """Serialize, edit, then enforce and persist (or, dry, only describe) the new set."""
        async with self._lock:
            old, old_gen = self.policy, self.generation
            new = edit(old)
            if dry_run:
                result = diff_policies(old, new, old_gen)
                result.dry_run = True
                checked, changing = await asyncio.to_thread(
                    sessions_changing, list(self._sessions()), new
                )
                result.sessions_checked, result.sessions_changing = checked, changing
                return result
            gen = await asyncio.to_thread(self._commit, old, old_gen, new)
            log.info("%s by %s: generation %d", what, actor, gen)
            self._audit(actor, what, gen)
            return diff_policies(old, new, gen)

    def _commit(self, old: PolicySet, old_gen: int, new: PolicySet) -> int:
        try:
            gen = self._apply(new, None)
        except StoreError:
            raise
        except Exception as e:
            raise ApplyFailed(f"the kernel refused the policy, nothing changed: {e}") from e
        try:
            self._persist(new, gen)
        except OSError as e:
            # The disk said no: put the kernel back so both stay on the old set.
            self._apply(old, None)
            raise ApplyFailed(f"saving the policy failed, nothing changed: {e}") from e
        self.policy, self.generation = new, gen
        return gen

    def _audit(self, actor: str, what: str, generation: int) -> None:
        try:
            line = orjson.dumps(
                {"time": time.time(), "actor": actor, "change": what, "generation": generation}
            )
            with (self.state_dir / CHANGES_FILE).open("ab") as f:
                f.write(line + b"\n")
        except OSError as e:
            log.warning("could not append to the change log: %s", e)
