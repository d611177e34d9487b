"""The fan-out (`streamer.events.fanout`) and the pipeline in front of it
(`streamer.events.pipeline`): a slow sink drops with lost records and slows nobody, a failing
sink is contained (also one ending with a CancelledError it did not ask for: restarted), and
events no sink has room for are shed before rendering."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from support.events import flow_obj, gap_check, lost_factory

from streamer.events.decode import FlowEvent, encode
from streamer.events.enrich import Enricher
from streamer.events.fanout import Channel, Fanout, make_item
from streamer.events.pipeline import Pipeline, PipelineConfig
from streamer.events.sinks.file import FileSinkConfig

# ---- fan-out ---------------------------------------------------------------------------------


class ListSink:
    """Collects what it gets; `delay` seconds per item (a slow sink), or fails."""

    def __init__(
        self, name: str, delay: float = 0.0, fail_every: int = 0, fail_times: int = 0
    ) -> None:
        self.name = name
        self.delay = delay
        self.fail_every = fail_every
        self.fail_times = fail_times
        self.got: list[dict[str, Any]] = []
        self.batches = 0

    async def run(self, channel: Channel) -> None:
        while True:
            items = await channel.get_batch(64)
            if not items:
                return
            self.batches += 1
            if self.fail_times and self.batches % self.fail_every == 0:
                self.fail_times -= 1
                channel.report_lost(sum(i.weight for i in items), items[0].seq, items[-1].seq)
                raise OSError("this sink fails now and then")
            for item in items:
                if self.delay:
                    await asyncio.sleep(self.delay)
                self.got.append(json.loads(item.data))

    def stats(self) -> dict[str, Any]:
        return {"delivered": sum(1 for o in self.got if o.get("type") != "lost")}


async def test_a_slow_sink_drops_with_lost_records_and_slows_nobody() -> None:
    en = Enricher({1: "eth0"}, host="h")
    slow, fast = ListSink("slow", delay=0.002), ListSink("fast")
    fan = Fanout([slow, fast], lost_factory(en), {"slow": 50, "fast": 100_000})
    task = asyncio.create_task(fan.run())
    n = 0
    publish_s = 0.0
    for _ in range(20):
        batch = [make_item(flow_obj(en)) for _ in range(250)]
        n += len(batch)
        t0 = time.perf_counter()
        fan.publish(batch)
        publish_s = max(publish_s, time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    fan.close()
    await asyncio.wait_for(task, 60)
    # The reader's side never waited for the slow sink.
    assert publish_s < 0.05, publish_s
    assert gap_check(fast.got, n) == (n, 0)
    seen, lost = gap_check(slow.got, n)
    assert seen + lost == n and lost > 0, (seen, lost)
    st = fan.stats()
    assert st["slow"]["queue_dropped"] == lost and st["fast"]["queue_dropped"] == 0
    assert st["slow"]["received"] == st["fast"]["received"] == n
    # Lost records sit where the gap is: right after the last event before it.
    stream = slow.got
    for i, obj in enumerate(stream):
        if obj.get("type") == "lost":
            before = [o["seq"] for o in stream[:i] if o.get("type") != "lost"]
            assert not before or max(before) < obj["first_seq"]
            assert obj["stage"] == "slow"


async def test_a_failing_sink_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    en = Enricher({}, host="h")
    bad, good = ListSink("bad", fail_every=3, fail_times=4), ListSink("good")
    fan = Fanout([bad, good], lost_factory(en), 10_000)
    task = asyncio.create_task(fan.run())
    caplog.set_level(logging.ERROR, logger="microseg.fanout")
    n = 0
    deadline = time.monotonic() + 20
    while fan.sink_errors["bad"] < 4 and time.monotonic() < deadline:
        batch = [make_item(flow_obj(en)) for _ in range(64)]
        n += len(batch)
        fan.publish(batch)
        await asyncio.sleep(0.05)
    fan.close()
    await asyncio.wait_for(task, 60)
    assert fan.sink_errors["bad"] >= 4
    assert gap_check(good.got, n) == (n, 0)
    seen, lost = gap_check(bad.got, n)
    assert lost > 0 and seen + lost == n
    # Logged, but rate-limited: one line for several failures.
    lines = [r for r in caplog.records if "sink bad failed" in r.getMessage()]
    assert 1 <= len(lines) < fan.sink_errors["bad"], [r.getMessage() for r in lines]


async def test_a_sink_ending_with_a_cancel_it_did_not_ask_for_is_restarted() -> None:
    """A sink's run that ends with a CancelledError nobody asked for (it awaited a future
    its owner cancelled) is a failure like any other: counted, restarted, nothing lost
    (a TaskGroup would take it for a requested stop, and the sink would be gone unseen)."""

    class Strays(ListSink):
        strayed = False

        async def run(self, channel: Channel) -> None:
            if not self.strayed:
                self.strayed = True
                fut = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_soon(fut.cancel)
                await fut
            await super().run(channel)

    en = Enricher({}, host="h")
    sink = Strays("strays")
    fan = Fanout([sink], lost_factory(en), 10_000)
    task = asyncio.create_task(fan.run())
    batch = [make_item(flow_obj(en)) for _ in range(100)]
    fan.publish(batch)
    deadline = time.monotonic() + 10
    while len(sink.got) < len(batch) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    fan.close()
    await asyncio.wait_for(task, 10)
    assert fan.sink_errors["strays"] == 1
    assert gap_check(sink.got, len(batch)) == (len(batch), 0)


async def test_events_no_sink_has_room_for_are_shed_before_rendering(tmp_path: Path) -> None:
    """A drained batch larger than every sink's free room: what fits is rendered and queued,
    the rest only gets its sequence numbers, and each sink a lost record for the gap, in
    place (nothing is rendered that every sink would drop)."""
    en = Enricher({1: "eth0"}, host="h")
    path = tmp_path / "events.jsonl"
    pipe = Pipeline(PipelineConfig(file=FileSinkConfig(path), queue_size=10), None, en)
    ev = FlowEvent(
        1, 1, 60, 1, None, 1, 4, 6, "ingress", "deny", "10.0.0.1", "10.0.0.2", 1, 2, 2, "new"
    )
    pipe.handle([encode(ev)] * 25)
    assert (pipe.enriched, pipe.shed, en.seq) == (10, 15, 25)
    ch = pipe.fanout.channels["file"]
    assert (ch.received, ch.dropped, ch.depth, ch.room) == (25, 15, 10, 0)
    pipe.handle([encode(ev)] * 3)  # still no room: shed whole
    assert (pipe.enriched, pipe.shed, en.seq) == (10, 18, 28)
    pipe.fanout.close()
    await asyncio.wait_for(pipe.fanout.run(), 10)
    got = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [o["seq"] for o in got if o["type"] == "flow"] == list(range(1, 11))
    (lost,) = [o for o in got if o["type"] == "lost"]
    assert (lost["first_seq"], lost["seq"], lost["lost"], lost["stage"]) == (11, 28, 18, "file")
    gap_check(got, 28)
    st = pipe.stats()
    assert st["enrich"]["dropped"] == 18 and st["lost"]["queues"] == 18
