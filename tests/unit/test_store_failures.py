"""PolicyStore.apply_failures (`microseg_policy_apply_failures_total`): a change the kernel, the
classifier's compiler or the disk refused is counted once and changes nothing; a request
refused as invalid (a duplicate rule) is not counted.

A kernel stand-in that can be told to raise replaces the datapath; the disk failure is the
journal refusing to write.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from streamer.policy.model import PolicySet, Rule
from streamer.policy.store import ApplyFailed, DuplicateRule, PolicyStore, StoreError


class _Kernel:
    """Whole-set applier; `fail` is raised (once set) instead of applying."""

    def __init__(self) -> None:
        self.gen = 0
        self.fail: Exception | None = None

    def __call__(self, _policy: PolicySet, _generation: int | None) -> int:
        if self.fail is not None:
            raise self.fail
        self.gen += 1
        return self.gen


def _rule(i: int) -> Rule:
    return Rule.model_validate({"rule_id": i, "protocol": "tcp", "dst_port": i, "action": "deny"})


def _store(tmp_path: Path, kernel: _Kernel) -> PolicyStore:
    store = PolicyStore(tmp_path, kernel)
    store.restore(PolicySet(), 0)
    return store


def test_refusals_of_the_kernel_compiler_and_disk_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = _Kernel()
    store = _store(tmp_path, kernel)

    async def go() -> None:
        await store.add(_rule(1), "test")
        gen = store.generation
        assert store.apply_failures == 0

        # Invalid: refused before anything is applied, not a failure to apply.
        with pytest.raises(DuplicateRule):
            await store.add(_rule(1), "test")
        assert store.apply_failures == 0

        kernel.fail = RuntimeError("injected kernel failure")
        with pytest.raises(ApplyFailed):
            await store.add(_rule(2), "test")
        assert store.apply_failures == 1

        # The applier's own StoreError (a set the classifier cannot hold) passes as it is.
        kernel.fail = StoreError("too many shapes")
        with pytest.raises(StoreError, match="too many shapes"):
            await store.add(_rule(3), "test")
        assert store.apply_failures == 2

        kernel.fail = None

        def refuse(*_a: Any, **_k: Any) -> None:
            raise OSError("disk full")

        # A dry run applies nothing: never a failure.
        await store.add(_rule(4), "test", dry_run=True)
        monkeypatch.setattr(store.journal, "snapshot", refuse)
        with pytest.raises(ApplyFailed, match="saving the policy failed"):
            await store.replace(PolicySet(), "test")
        assert store.apply_failures == 3
        assert [r.rule_id for r in store.policy.policies] == [1]
        assert store.generation == gen

    asyncio.run(go())
