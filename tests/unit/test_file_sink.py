"""The file sink (`streamer.events.sinks.file`): rotation by size, and a failing write counted
and reported."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from support.events import flow_obj, gap_check, lost_factory

from streamer.events.enrich import Enricher
from streamer.events.fanout import Channel, make_item
from streamer.events.sinks.file import FileSink, FileSinkConfig

# ---- the file sink -----------------------------------------------------------------------------


async def test_file_sink_rotates_by_size(tmp_path: Path) -> None:
    en = Enricher({}, host="h")
    path = tmp_path / "ev" / "events.jsonl"
    sink = FileSink(FileSinkConfig(path, max_bytes=20_000, keep=2))
    ch = Channel("file", 100_000, lost_factory(en))
    items = [make_item(flow_obj(en)) for _ in range(300)]
    line = len(items[0].data) + 1
    for item in items:
        ch.offer(item)
    ch.close()
    await sink.run(ch)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"], files
    seqs: list[int] = []
    for p in (path.parent / "events.jsonl.2", path.parent / "events.jsonl.1", path):
        data = p.read_bytes()
        assert len(data) <= 20_000 and data.endswith(b"\n")
        if p != path:
            assert len(data) > 20_000 - line  # rotated only when the next line would not fit
        seqs += [json.loads(x)["seq"] for x in data.splitlines()]
    # The newest lines, in order, with nothing missing; older ones rotated away.
    assert seqs == list(range(seqs[0], 301)) and seqs[0] > 1
    assert sink.rotations == 300 * line // 20_000 or sink.rotations >= 3
    assert sink.stats()["delivered"] == 300 and sink.failed == 0
    # A restart appends to the live file (and rotates it when full).
    sink2 = FileSink(FileSinkConfig(path, max_bytes=20_000, keep=2))
    ch2 = Channel("file", 10, lost_factory(en))
    ch2.offer(make_item(flow_obj(en)))
    ch2.close()
    await sink2.run(ch2)
    assert json.loads(path.read_bytes().splitlines()[-1])["seq"] == 301


async def test_file_sink_write_failure_is_counted_and_reported(tmp_path: Path) -> None:
    en = Enricher({}, host="h")
    path = tmp_path / "events.jsonl"
    path.mkdir()  # opening it for appending fails
    sink = FileSink(FileSinkConfig(path))
    ch = Channel("file", 1000, lost_factory(en))
    task = asyncio.create_task(sink.run(ch))
    for _ in range(5):
        ch.offer(make_item(flow_obj(en)))
    await asyncio.sleep(0.2)
    assert sink.failed == 5
    path.rmdir()  # writable again: the lost record goes first, then new events
    for _ in range(3):
        ch.offer(make_item(flow_obj(en)))
    ch.close()
    await asyncio.wait_for(task, 10)
    got = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert got[0]["type"] == "lost" and got[0]["lost"] == 5 and got[0]["stage"] == "file"
    assert (got[0]["first_seq"], got[0]["seq"]) == (1, 5)
    assert [o["seq"] for o in got[1:]] == [6, 7, 8]
    gap_check(got, 8)
