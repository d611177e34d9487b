"""streamer.policy.journal through the store: single changes are journal lines after the
snapshot, a compaction keeps exactly the set, a torn last line is dropped, a damaged one
before it is an error. The kernel is left out (an applier that counts generations)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streamer.policy import journal
from streamer.policy.model import PolicyError, PolicySet, Rule
from streamer.policy.store import PolicyStore, persisted_document


def _store(state_dir: Path) -> PolicyStore:
    gen = {"n": 0}

    def applier(_policy: PolicySet, _generation: int | None) -> int:
        gen["n"] += 1
        return gen["n"]

    return PolicyStore(state_dir, applier)


def _rule(i: int) -> Rule:
    return Rule.model_validate({"rule_id": i, "protocol": "tcp", "dst_port": i, "action": "allow"})


def test_changes_go_to_the_journal_and_compaction_keeps_the_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "COMPACT_RECORDS", 7)
    store = _store(tmp_path)
    store.restore(PolicySet(), 0)

    async def writes() -> None:
        for i in range(1, 30):
            await store.add(_rule(i), "test")
            if i % 3 == 0:
                await store.delete(i - 1, "test")
            if i % 5 == 0:
                await store.update(_rule(i).model_copy(update={"name": f"r{i}"}), "test")

    asyncio.run(writes())
    store.close()
    doc = persisted_document(tmp_path)
    assert doc is not None
    assert doc["generation"] == store.generation
    assert doc["policies"] == [r.to_api() for r in store.policy.policies]
    assert (tmp_path / journal.JOURNAL_FILE).stat().st_size < 2000  # compacted meanwhile

    # A torn last line (a crash while appending) is dropped; a damaged earlier one is not.
    path = tmp_path / journal.JOURNAL_FILE
    path.write_bytes(path.read_bytes() + b'{"op": "add", "gen')
    assert persisted_document(tmp_path) == doc
    path.write_bytes(b"not json\n" + path.read_bytes())
    with pytest.raises(PolicyError, match="damaged policy journal"):
        persisted_document(tmp_path)
