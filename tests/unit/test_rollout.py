"""Confirm or revert and the lockout guard as pure logic (contract §6): the store's pending
change (recorded before the change is saved, blocking other writes, confirmed or reverted as a
new generation with actor `revert`, adopted at start only when it is the saved set), the
agent's timer (streamer.agent.rollback) and its alert records, and the guard's judgement of
one connection (streamer.policy.lockout) with a session lookup standing in for the kernel's.
The kernel is left out (an applier that counts generations)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from streamer.agent.rollback import Rollback
from streamer.datapath.tables import session_key
from streamer.policy.lockout import Connection, LockedOut, LockoutGuard
from streamer.policy.model import Group, PolicySet, Rule
from streamer.policy.pending import PENDING_FILE, read_pending
from streamer.policy.store import (
    CHANGES_FILE,
    NotPending,
    PendingConflict,
    PolicyStore,
    StoreError,
    WriteOptions,
    persisted_document,
)


class Kernel:
    """An applier counting generations; `refuse` makes the next applies fail."""

    def __init__(self) -> None:
        self.gen = 0
        self.refuse = False
        self.applied: list[PolicySet] = []

    def __call__(self, policy: PolicySet, generation: int | None) -> int:
        if self.refuse:
            raise StoreError("the kernel said no")
        self.gen = max(self.gen + 1, generation or 0)
        self.applied.append(policy)
        return self.gen


def _rule(i: int, action: str = "allow", **kw: Any) -> Rule:
    return Rule.model_validate(
        {"rule_id": i, "protocol": "tcp", "dst_port": i, "action": action, **kw}
    )


def _store(tmp_path: Path, kernel: Kernel | None = None) -> PolicyStore:
    store = PolicyStore(tmp_path, kernel or Kernel())
    store.restore(PolicySet(policies=[_rule(1)]), 0)
    return store


def _changes(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / CHANGES_FILE).read_text().splitlines()]


def test_a_pending_change_blocks_writes_until_confirmed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    base = store.generation

    async def go() -> None:
        result = await store.add(_rule(2), "alice", opts=WriteOptions(confirm_within=60))
        assert result.pending is not None and result.pending.generation == result.generation
        assert result.to_api()["pending"]["generation"] == result.generation
        assert result.to_api()["pending"]["deadline"].endswith("Z")
        # Recorded on disk with what to put back.
        on_disk = read_pending(tmp_path)
        assert on_disk is not None and on_disk.base_generation == base
        assert [r.rule_id for r in on_disk.previous.policies] == [1]
        with pytest.raises(PendingConflict, match="waits for its confirmation"):
            await store.add(_rule(3), "bob")
        with pytest.raises(PendingConflict):
            await store.set_group("g", _grp(), "bob")
        dry = await store.add(_rule(3), "bob", dry_run=True)  # a dry run is answered
        assert dry.dry_run and store.rule(3) is None
        with pytest.raises(NotPending, match=f"generation {result.generation} is"):
            await store.confirm(result.generation + 5, "alice")
        await store.confirm(result.generation, "alice")
        assert store.pending is None and not (tmp_path / PENDING_FILE).exists()
        with pytest.raises(NotPending, match="no change is"):
            await store.confirm(result.generation, "alice")
        await store.add(_rule(3), "bob")  # writes go again

    asyncio.run(go())
    assert {r.rule_id for r in store.policy.policies} == {1, 2, 3}
    log = _changes(tmp_path)
    assert log[-3]["confirm_by"].endswith("Z") and log[-3]["actor"] == "alice"
    assert log[-2]["change"].startswith("confirm generation") and log[-2]["actor"] == "alice"


def _grp() -> Group:
    return Group(members=("10.0.0.0/8",))


def test_revert_puts_back_the_set_as_a_new_generation(tmp_path: Path) -> None:
    store = _store(tmp_path)

    async def go() -> None:
        new = PolicySet(default_action="deny", policies=[_rule(7, "deny")])
        result = await store.replace(new, "alice", opts=WriteOptions(confirm_within=60))
        pending = store.pending
        assert pending is not None
        reverted = await store.revert(pending)
        assert reverted is not None and reverted.generation == result.generation + 1
        assert store.pending is None and not (tmp_path / PENDING_FILE).exists()
        assert await store.revert(pending) is None  # no longer pending: nothing to do

    asyncio.run(go())
    assert [r.rule_id for r in store.policy.policies] == [1]
    assert store.policy.default_action.value == "allow"
    doc = persisted_document(tmp_path)
    assert doc is not None and doc["generation"] == store.generation
    last = _changes(tmp_path)[-1]
    assert last["actor"] == "revert" and last["change"].startswith("revert generation")


def test_a_revert_that_cannot_be_applied_leaves_the_change_and_unblocks(tmp_path: Path) -> None:
    kernel = Kernel()
    store = _store(tmp_path, kernel)

    async def go() -> None:
        await store.delete(1, "alice", opts=WriteOptions(confirm_within=60))
        pending = store.pending
        assert pending is not None
        kernel.refuse = True
        with pytest.raises(StoreError, match="said no"):
            await store.revert(pending)
        kernel.refuse = False
        assert store.pending is None and not (tmp_path / PENDING_FILE).exists()
        await store.add(_rule(5), "bob")

    asyncio.run(go())
    assert [r.rule_id for r in store.policy.policies] == [5]


def test_a_failed_write_leaves_no_pending_record(tmp_path: Path) -> None:
    kernel = Kernel()
    store = _store(tmp_path, kernel)
    kernel.refuse = True
    with pytest.raises(StoreError):
        asyncio.run(store.add(_rule(2), "alice", opts=WriteOptions(confirm_within=60)))
    assert store.pending is None and not (tmp_path / PENDING_FILE).exists()


def test_adopt_at_start_only_the_saved_changes_record(tmp_path: Path) -> None:
    store = _store(tmp_path)
    asyncio.run(store.add(_rule(2), "alice", opts=WriteOptions(confirm_within=60)))
    gen = store.generation
    store.close()

    again = PolicyStore(tmp_path, Kernel())
    found = again.read_persisted()
    assert found is not None and found[1] == gen
    again.restore(*found)
    adopted = again.adopt_pending(found[1])
    assert adopted is not None and adopted.generation == again.generation
    assert [r.rule_id for r in adopted.previous.policies] == [1]
    again.close()

    # A record of another generation than the saved set's is stale: removed.
    third = PolicyStore(tmp_path, Kernel())
    third.restore(PolicySet(), 0)
    assert third.adopt_pending(gen - 1) is None
    assert not (tmp_path / PENDING_FILE).exists()


def test_the_timer_reverts_and_alerts(tmp_path: Path) -> None:
    store = _store(tmp_path)
    alerts: list[dict[str, Any]] = []
    rollback = Rollback(store, alerts.append)

    async def go() -> None:
        timer = asyncio.create_task(rollback.run())
        try:
            await store.add(_rule(2), "alice", opts=WriteOptions(confirm_within=1))
            for _ in range(100):
                if store.pending is None:
                    break
                await asyncio.sleep(0.05)
            # A confirmed one stays, and the timer goes on.
            result = await store.add(_rule(3), "alice", opts=WriteOptions(confirm_within=1))
            await store.confirm(result.generation, "alice")
            await asyncio.sleep(1.2)
        finally:
            timer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await timer

    asyncio.run(go())
    assert {r.rule_id for r in store.policy.policies} == {1, 3}
    assert rollback.reverted == 1 and len(alerts) == 1, alerts
    a = alerts[0]
    assert (a["alert"], a["state"], a["severity"], a["threshold"]) == (
        "policy_reverted",
        "firing",
        "warning",
        1,
    )
    assert "not confirmed" in a["message"] and a["actor"] == "alice"


# ---- the lockout guard ----------------------------------------------------------------------


@dataclass
class FakeSession:
    family: int
    protocol: int
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    direction: str
    verdict: str = "allow"
    rule_id: int | None = None
    ifindex: int = 7


AGENT, CALLER = IPv4Address("198.18.0.1"), IPv4Address("198.18.0.2")


def _guard(found: FakeSession | None) -> tuple[LockoutGuard, list[tuple[Any, ...]]]:
    asked: list[tuple[Any, ...]] = []

    def lookup(*key: Any) -> FakeSession | None:
        asked.append(key)
        return found

    return LockoutGuard(lookup, {7: "eth0"}), asked


def test_the_guard_refuses_a_set_denying_the_callers_connection() -> None:
    session = FakeSession(4, 6, str(CALLER), str(AGENT), 40000, 8080, "ingress")
    guard, asked = _guard(session)
    check = guard.check_for(Connection(AGENT, 8080, CALLER, 40000))
    assert check is not None
    deny = PolicySet(
        default_action="allow",
        policies=[_rule(9, "deny", dst_port=8080, name="no-api", priority=300)],
    )
    with pytest.raises(LockedOut) as e:
        check(deny)
    msg = str(e.value)
    assert "tcp 198.18.0.2:40000 -> 198.18.0.1:8080" in msg and "ingress on eth0" in msg
    assert "rule 9 'no-api'" in msg and "force=1" in msg
    assert asked == [(7, 6, CALLER, AGENT, 40000, 8080)]
    with pytest.raises(LockedOut, match="default action"):
        check(PolicySet(default_action="deny"))
    check(PolicySet(default_action="deny", policies=[_rule(1, dst_port=8080)]))  # allowed
    check(PolicySet(default_action="allow"))


def test_the_guard_costs_nothing_for_loopback_and_unknown_connections() -> None:
    guard, asked = _guard(None)
    assert guard.check_for(None) is None
    assert guard.check_for(Connection(AGENT, 8080, IPv4Address("127.0.0.1"), 1)) is None
    check = guard.check_for(Connection(AGENT, 8080, CALLER, 40000))
    assert check is not None
    check(PolicySet(default_action="deny"))  # no session on an attached interface: fine
    assert len(asked) == 1


def test_connection_of_transport_addresses() -> None:
    conn = Connection.of(("::ffff:198.18.0.1", 8080, 0, 0), ("::ffff:198.18.0.2", 5, 0, 0))
    assert conn == Connection(AGENT, 8080, CALLER, 5)
    assert Connection.of("/run/api.sock", "") is None
    assert Connection.of(None, None) is None
    v6 = Connection.of(("fd00::1", 80, 0, 0), ("fd00::2", 5, 0, 0))
    assert v6 is not None and str(v6) == "tcp [fd00::2]:5 -> [fd00::1]:80"


def test_session_key_is_direction_independent() -> None:
    a, b = ip_address("10.0.0.2"), ip_address("10.0.0.1")
    k = session_key(3, 6, a, b, 40000, 80)
    assert k == session_key(3, 6, b, a, 80, 40000)
    assert k[8:12] == b.packed and k[24:28] == a.packed  # the lower endpoint first
    assert k[40:42] == (80).to_bytes(2, "big")
    with pytest.raises(ValueError):
        session_key(3, 6, a, ip_address("::1"), 1, 2)
