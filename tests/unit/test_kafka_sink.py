"""The Kafka sink against a stand-in producer (no broker): a broker that is up but slower
than the events spools only what would otherwise overflow the sink's queue, keeps the order
and loses nothing; one that keeps up gets everything directly. Batches are sized by the round
trip: keeping up, the next batch is handed over only once the previous one is answered (and
takes everything that came meanwhile), closed so the producer does not linger on it; behind,
one more waits in the producer behind the one in flight, never more. And the batch filling
that goes straight into aiokafka's record builder writes what the public `append` would.
An inner task's failure ends the sink's run with that error (its supervisor restarts it, and
what was taken is sent after the restart); so does a CancelledError nobody asked for; a batch
the producer cancels is sent again, not the end of the acknowledgements.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from streamer.events.fanout import Channel, Fanout, Item
from streamer.events.sinks.kafka import KafkaSink, KafkaSinkConfig, _fill_batch
from streamer.events.sinks.spool import Spool
from streamer.events.tasks import StrayCancel


class _Batch:
    """Takes `append`s like aiokafka's BatchBuilder, up to `cap` records."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.recs: list[tuple[bytes, bytes]] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def append(self, *, key: bytes, value: bytes, timestamp: int | None) -> object | None:
        if len(self.recs) >= self.cap:
            return None
        self.recs.append((key, value))
        return object()


class _Producer:
    """Acknowledges each batch `delay` seconds after the previous one (one at a time, in
    order, like the idempotent producer on one partition)."""

    def __init__(self, delay: float, cap: int = 50) -> None:
        self.delay = delay
        self.cap = cap
        self.delivered: list[bytes] = []
        self.batches: list[_Batch] = []
        self.unanswered = 0
        self.max_unanswered = 0
        self._last = 0.0

    def create_batch(self) -> _Batch:
        return _Batch(self.cap)

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._last = max(self._last, loop.time()) + self.delay
        self.batches.append(batch)
        self.unanswered += 1
        self.max_unanswered = max(self.max_unanswered, self.unanswered)

        def ack() -> None:
            self.delivered.extend(v for _k, v in batch.recs)
            self.unanswered -= 1
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


async def _stream(
    tmp_path: Path,
    delay: float,
    per_ms: int,
    total: int,
    *,
    cap: int = 50,
    window: int = 200,
    burst: int = 0,
) -> tuple[_Sink, Channel]:
    """`total` events offered `per_ms` at a time every millisecond (after `burst` at once) to
    a sink whose broker takes a batch of `cap` every `delay` s; returns once the sink has
    written everything."""
    cfg = KafkaSinkConfig(
        bootstrap="127.0.0.1:9",
        spool_dir=tmp_path / "spool",
        window_records=window,
        stall_seconds=30.0,
    )
    sink = _Sink(cfg, _Producer(delay, cap))
    ch = Channel("kafka", 2000, lambda lost, stage, a, b: _item(b))
    task = asyncio.create_task(sink.run(ch))
    while not sink.up:
        await asyncio.sleep(0.005)
    seq = min(burst, total)
    assert ch.offer_batch([_item(s) for s in range(1, seq + 1)]) == seq
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


async def test_keeping_up_the_next_batch_waits_for_the_answer_and_takes_what_came(
    tmp_path: Path,
) -> None:
    # 10 events a ms, each batch answered 20 ms after it is handed over: one batch out at a
    # time, each with what arrived during the previous round trip (~200), none lingering.
    sink, _ch = await _stream(tmp_path, 0.02, 10, 3000, cap=5000, window=20_000)
    p = sink.fake
    assert p.delivered == [b'{"seq":%d}' % s for s in range(1, 3001)]
    assert p.max_unanswered == 1
    assert all(b.closed for b in p.batches)
    # ~300 ms of events in 20 ms round trips: about 15 batches (not 3,000, not 1)
    assert 8 <= len(p.batches) <= 40, [len(b.recs) for b in p.batches]
    assert max(len(b.recs) for b in p.batches) >= 100


async def test_behind_one_more_batch_waits_behind_the_one_in_flight(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import streamer.events.sinks.kafka as kafka

    monkeypatch.setattr(kafka, "SEND_ROUND", 100)
    # A backlog of 1,500 (15 rounds) at once: two batches out at a time while it lasts.
    sink, ch = await _stream(tmp_path, 0.01, 1, 1600, cap=100, window=20_000, burst=1500)
    p = sink.fake
    assert p.delivered == [b'{"seq":%d}' % s for s in range(1, 1601)]
    assert p.max_unanswered == 2
    assert sink.spooled == 0 and ch.dropped == 0


def _config(tmp_path: Path) -> KafkaSinkConfig:
    return KafkaSinkConfig(
        bootstrap="127.0.0.1:9",
        spool_dir=tmp_path / "spool",
        window_records=200,
        stall_seconds=30.0,
    )


def _lost(lost: int, stage: str, first: int, last: int) -> Item:
    return _item(last)


def _seqs(data: list[bytes]) -> list[int]:
    """The seqs of `data` (delivered values), each once, in order of first delivery."""
    return list(dict.fromkeys(int(v[7:-1]) for v in data))


async def _wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_failed_inner_task_reaches_the_sink_supervisor_and_nothing_is_lost(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pump fails right after handing its third batch over: the sink's run ends with
    that error (its acks and connection tasks and the intake stop), its supervisor logs and
    restarts it, and the records that were in flight go out after the restart."""

    class _Buggy(_Sink):
        sends = 0

        async def _send(self, recs: Any) -> None:
            await super()._send(recs)
            self.sends += 1
            if self.sends == 3:
                raise RuntimeError("a bug in the pump")

    caplog.set_level(logging.ERROR, logger="microseg.fanout")
    sink = _Buggy(_config(tmp_path), _Producer(0.002))
    fan = Fanout([sink], _lost, 5000)
    task = asyncio.create_task(fan.run())
    total = 2000
    for first in range(1, total + 1, 10):
        fan.publish([_item(s) for s in range(first, first + 10)])
        await asyncio.sleep(0.001)
    await _wait_until(lambda: sink.delivered >= total)
    fan.close()
    await asyncio.wait_for(task, 10)
    assert fan.sink_errors["kafka"] == 1
    assert any(
        "sink kafka failed (RuntimeError: a bug in the pump)" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    # In flight at the failure: sent again after the restart (the broker may get them twice).
    assert _seqs(sink.fake.delivered) == list(range(1, total + 1))
    assert fan.channels["kafka"].dropped == 0 and sink.failed == 0 and sink.spool_dropped == 0


async def test_a_cancel_an_inner_task_did_not_ask_for_ends_the_run_with_an_error(
    tmp_path: Path,
) -> None:
    """The producer raises CancelledError into the pump (awaiting a future the library
    cancelled): the sink's run raises instead of going on without a pump, and what the pump
    held is in the spool."""

    class _Cancelling(_Producer):
        async def send_batch(self, batch: _Batch, topic: str, partition: int) -> Any:
            if len(self.batches) == 2:
                raise asyncio.CancelledError
            return await super().send_batch(batch, topic, partition)

    cfg = _config(tmp_path)
    sink = _Sink(cfg, _Cancelling(0.002))
    ch = Channel("kafka", 2000, _lost)
    total = 500
    assert ch.offer_batch([_item(s) for s in range(1, total + 1)]) == total
    with pytest.raises(StrayCancel, match="kafka-pump ended"):
        await asyncio.wait_for(sink.run(ch), 10)  # the channel is still open
    spool = Spool(cfg.spool_dir, cfg.spool_max_bytes)
    kept = [r.seq for r in spool.take(total, 1 << 24)]
    spool.close()
    taken = sink.received
    assert sorted(set(_seqs(sink.fake.delivered)) | set(kept)) == list(range(1, taken + 1))


async def test_a_batch_the_producer_cancels_is_sent_again(tmp_path: Path) -> None:
    """The producer cancels the future of the first batch (as aiokafka may when it closes)
    instead of answering it: that is a failed send (reconnect, send again), not the end of
    the acknowledgements."""

    class _CancelsFirst(_Producer):
        async def send_batch(self, batch: _Batch, topic: str, partition: int) -> Any:
            if self.batches:
                return await super().send_batch(batch, topic, partition)
            self.batches.append(batch)
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(fut.cancel)
            return fut

    sink = _Sink(_config(tmp_path), _CancelsFirst(0.05))
    ch = Channel("kafka", 2000, _lost)
    task = asyncio.create_task(sink.run(ch))
    total = 300
    assert ch.offer_batch([_item(s) for s in range(1, total + 1)]) == total
    await _wait_until(lambda: sink.delivered >= total)
    ch.close()
    await asyncio.wait_for(task, 10)
    # (The stand-in took the batch behind the cancelled one; a real producer would fail it
    # too. The order is not the point here: that every record arrives, once.)
    assert sorted(int(v[7:-1]) for v in sink.fake.delivered) == list(range(1, total + 1))
    assert sink.delivered == total and sink.reconnects == 1 and sink.failed == 0


def test_fill_batch_writes_what_aiokafkas_append_would() -> None:
    from aiokafka.producer.message_accumulator import BatchBuilder
    from aiokafka.record.default_records import DefaultRecordBatch

    recs = [_item(s) for s in range(1, 3001)]
    fast = BatchBuilder(64 * 1024, 0)
    taken = _fill_batch(fast, recs)
    assert 0 < taken < len(recs)  # it filled up and said so
    assert (
        fast.record_count() == taken and fast.append(key=b"k", value=b"v", timestamp=None) is None
    )
    slow = BatchBuilder(64 * 1024, 0)
    for r in recs[:taken]:
        assert slow.append(key=r.key, value=r.data, timestamp=None) is not None
    assert slow.append(key=recs[taken].key, value=recs[taken].data, timestamp=None) is None
    for b in (fast, slow):
        b._set_producer_state(1, 0, 0)
    got = [(r.offset, r.key, r.value) for r in DefaultRecordBatch(bytes(fast._build()))]
    want = [(r.offset, r.key, r.value) for r in DefaultRecordBatch(bytes(slow._build()))]
    assert got == want == [(i, r.key, r.data) for i, r in enumerate(recs[:taken])]
