"""PolicyStore.sync (a fleet generation or a select group's new members, as the smallest edit
that gets there) and the managed store (fleet mode: local writes refused with 409 managed).

An edit applier that records what it was given stands in for the kernel: whether a change
went in place (an Edit) or as a whole set is what is checked, and that the journal replays to
the same set after a restart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from streamer.policy.model import PolicySet, parse_policy_document
from streamer.policy.state import Edit, PolicyState
from streamer.policy.store import Managed, PolicyStore, WriteOptions


class _Kernel:
    def __init__(self) -> None:
        self.gen = 0
        self.calls: list[str] = []

    def whole(self, _policy: PolicySet, _generation: int | None) -> int:
        self.calls.append("whole")
        self.gen += 1
        return self.gen

    def edit(self, _edit: Edit, _state: PolicyState) -> int:
        self.calls.append("edit")
        self.gen += 1
        return self.gen


def _doc(
    rules: list[dict[str, Any]], groups: dict[str, Any] | None = None, default: str = "deny"
) -> PolicySet:
    return parse_policy_document(
        {"default_action": default, "groups": groups or {}, "policies": rules}
    )


def _r(i: int, **kw: Any) -> dict[str, Any]:
    return {"rule_id": i, "protocol": "tcp", "dst_port": i, "action": "allow", **kw}


def _store(tmp_path: Path, kernel: _Kernel) -> PolicyStore:
    store = PolicyStore(tmp_path, kernel.whole, edit_applier=kernel.edit)
    store.restore(PolicySet(), 0)
    return store


def test_sync_goes_in_place_when_it_can_and_whole_when_it_must(tmp_path: Path) -> None:
    kernel = _Kernel()
    store = _store(tmp_path, kernel)
    groups = {"db": {"members": ["10.0.0.1"]}}
    steps = [
        (_doc([_r(1), _r(2, dst_group="db")], groups), "whole"),  # a new group: whole
        (_doc([_r(1, name="x"), _r(3), _r(2, dst_group="db")], groups), "edit"),  # rules
        (_doc([_r(1, name="x"), _r(3), _r(2, dst_group="db")], groups, "allow"), "edit"),
        (
            _doc(
                [_r(1, name="x"), _r(3), _r(2, dst_group="db")],
                {"db": {"members": ["10.0.0.2"]}},
                "allow",
            ),
            "edit",  # one group's members
        ),
        (_doc([_r(3)], {"db": {"members": ["10.0.0.3"]}}), "whole"),  # members and rules
    ]

    async def go() -> None:
        for policy, how in steps:
            before = len(kernel.calls)
            result = await store.sync(policy, "fleet", "test")
            assert kernel.calls[before:] == [how]
            assert result.generation == store.generation
            assert store.policy.to_api() == PolicyState.of(policy).policy_set().to_api() or (
                sorted(r.rule_id for r in store.policy.policies)
                == sorted(r.rule_id for r in policy.policies)
            )
        # The same set again changes nothing.
        calls, gen = len(kernel.calls), store.generation
        result = await store.sync(steps[-1][0], "fleet", "again")
        assert len(kernel.calls) == calls and result.generation == gen

    asyncio.run(go())
    store.close()
    # What the journal keeps replays to the set in force.
    again = PolicyStore(tmp_path, kernel.whole)
    found = again.read_persisted()
    assert found is not None
    assert found[0].to_api() == store.policy.to_api() and found[1] == store.generation


def test_a_managed_store_refuses_local_writes_but_not_the_fleets(tmp_path: Path) -> None:
    kernel = _Kernel()
    store = _store(tmp_path, kernel)
    store.managed_by = "topic microseg.policy on 127.0.0.1:9092"

    async def go() -> None:
        with pytest.raises(Managed, match="microseg fleet apply") as info:
            await store.replace(_doc([_r(1)]), "api")
        assert info.value.status == 409 and info.value.code == "managed"
        dry = await store.replace(_doc([_r(1)]), "api", dry_run=True)
        assert dry.dry_run and [r.rule_id for r in dry.added] == [1]
        with pytest.raises(Managed):
            await store.confirm(1, "api")
        await store.sync(_doc([_r(1)]), "fleet", "gen 1", WriteOptions(fleet=True))
        assert [r.rule_id for r in store.policy.policies] == [1]

    asyncio.run(go())
    store.close()
