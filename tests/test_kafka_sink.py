"""The Kafka sink against a stand-in producer (no broker): a broker that is up but slower
than the events spools only what would otherwise overflow the sink's queue, keeps the order
and loses nothing; one that keeps up gets everything directly. And the batch filling that
goes straight into aiokafka's record builder writes what the public `append` would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from streamer.fanout import Channel, Item
from streamer.sinks.kafka import KafkaSink, KafkaSinkConfig, _fill_batch


class _Batch:
    """Takes `append`s like aiokafka's BatchBuilder, up to `cap` records."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.recs: list[tuple[bytes, bytes]] = []

    def append(self, *, key: bytes, value: bytes, timestamp: int | None) -> object | None:
        if len(self.recs) >= self.cap:
            return None
        self.recs.append((key, value))
        return object()


class _Producer:
    """Acknowledges each batch `delay` seconds after the previous one (one at a time, in
    order, like the idempotent producer on one partition)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.delivered: list[bytes] = []
        self._last = 0.0

    def create_batch(self) -> _Batch:
        return _Batch(50)

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._last = max(self._last, loop.time()) + self.delay

        def ack() -> None:
            self.delivered.extend(v for _k, v in batch.recs)
            fut.set_result(None)

        loop.call_at(self._last, ack)
        return fut

    async def flush(self) -> None:
        await asyncio.sleep(self._last - asyncio.get_running_loop().time() + 0.01)

    async def stop(self) -> None:
        return None


class _Sink(KafkaSink):
    def __init__(self, config: KafkaSinkConfig, producer: _Producer) -> None:
        super().__init__(config)
        self.fake = producer

    async def _connect(self) -> Any:
        self._partitions = [0]
        return self.fake


def _item(seq: int) -> Item:
    return Item(seq, 1, b'{"seq":%d}' % seq, b"10.0.0.1->10.0.0.2")


async def _stream(tmp_path: Path, delay: float, per_ms: int, total: int) -> tuple[_Sink, Channel]:
    """`total` events offered `per_ms` at a time every millisecond to a sink whose broker
    takes a batch of 50 every `delay` s; returns once the sink has written everything."""
    cfg = KafkaSinkConfig(bootstrap="127.0.0.1:9", spool_dir=tmp_path / "spool",
                          window_records=200, stall_seconds=30.0)
    sink = _Sink(cfg, _Producer(delay))
    ch = Channel("kafka", 2000, lambda lost, stage, a, b: _item(b))
    task = asyncio.create_task(sink.run(ch))
    while not sink.up:
        await asyncio.sleep(0.005)
    seq = 0
    while seq < total:
        n = min(per_ms, total - seq)
        assert ch.offer_batch([_item(s) for s in range(seq + 1, seq + n + 1)]) == n
        seq += n
        await asyncio.sleep(0.001)
    while sink.delivered < total:
        await asyncio.sleep(0.01)
    ch.close()
    await asyncio.wait_for(task, 10)
    return sink, ch


async def test_a_slow_broker_spools_only_the_overflow_and_keeps_the_order(
    tmp_path: Path,
) -> None:
    # ~100 events/ms offered, ~10 taken (50 per 5 ms): the queue (2,000) cannot hold it all.
    sink, ch = await _stream(tmp_path, 0.005, 100, 6000)
    assert ch.dropped == 0
    assert sink.fake.delivered == [b'{"seq":%d}' % s for s in range(1, 6001)]
    assert sink.delivered == 6000 and sink.spool_dropped == 0 and sink.failed == 0
    # Some had to go to disk, but only the overflow: the half of the queue (1,000) left
    # waiting in it while the spool was replayed went directly.
    assert 0 < sink.spooled <= 6000 - 1000, sink.stats()
    assert sink.replayed == sink.spooled


async def test_a_busy_broker_that_keeps_up_gets_everything_directly(tmp_path: Path) -> None:
    # The window (200) fills now and then, the queue never comes near full: nothing spooled.
    sink, ch = await _stream(tmp_path, 0.002, 10, 3000)
    assert ch.dropped == 0 and sink.spooled == 0
    assert sink.fake.delivered == [b'{"seq":%d}' % s for s in range(1, 3001)]


def test_fill_batch_writes_what_aiokafkas_append_would() -> None:
    from aiokafka.producer.message_accumulator import BatchBuilder
    from aiokafka.record.default_records import DefaultRecordBatch

    recs = [_item(s) for s in range(1, 3001)]
    fast = BatchBuilder(64 * 1024, 0)
    taken = _fill_batch(fast, recs)
    assert 0 < taken < len(recs)  # it filled up and said so
    assert fast.record_count() == taken and fast.append(key=b"k", value=b"v",
                                                        timestamp=None) is None
    slow = BatchBuilder(64 * 1024, 0)
    for r in recs[:taken]:
        assert slow.append(key=r.key, value=r.data, timestamp=None) is not None
    assert slow.append(key=recs[taken].key, value=recs[taken].data, timestamp=None) is None
    for b in (fast, slow):
        b._set_producer_state(1, 0, 0)
    got = [(r.offset, r.key, r.value) for r in DefaultRecordBatch(bytes(fast._build()))]
    want = [(r.offset, r.key, r.value) for r in DefaultRecordBatch(bytes(slow._build()))]
    assert got == want == [(i, r.key, r.data) for i, r in enumerate(recs[:taken])]
