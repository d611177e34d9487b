"""The Kafka sink: flow events to a topic, with a spool on disk while the broker is away.

In: a channel of Items. Out: one Kafka record per Item on `topic` (created if missing), key
`<src_ip>-><dst_ip>`, value the JSON object (or, `format="ocsf"`, its OCSF event); `acks=all`,
idempotent producer, zstd (or lz4, else gzip) compression, batches sized by the round trip: a
batch is closed and sent as soon as no request of ours is out (aiokafka keeps one request per
broker in flight anyway), with what arrived meanwhile, and only while a batch or more is
waiting does one more wait in the producer behind the one in flight; no fixed linger, so the
wait adapts to the rate (tens of records a batch at a few thousand events/s, hundreds to
thousands at 100,000/s: the slower the broker, the bigger and fewer its requests).

Every record is either sent directly or, when it cannot be right now, appended to the spool;
the spool is replayed, oldest first, whenever the broker acknowledges again, and records go
directly again only once the spool is empty (so the topic gets them in order). "Cannot right
now" means: not connected, or the oldest unacknowledged batch older than `stall_seconds` (the
broker is down or too slow). A broker that is up but merely slower than the events (the window
of `window_records` unacknowledged records full, or the spool still being replayed) leaves new
records waiting in the sink's channel; only what would overflow the channel goes to the spool
(writing to disk and reading back is the dearest way to send, and the agent is behind already).
Records handed to the producer carry one timestamp per batch (CreateTime). The idempotent
producer retries a sent batch until the broker takes it, so a broker restart loses nothing and
duplicates nothing. Only a full spool drops records (the oldest; counted, logged, and a `lost`
record put in their place); a record the broker refuses outright (too large, not authorized)
is counted as failed, logged, and reported with a `lost` record too. At stop, records taken but
not acknowledged in time go back to the spool for the next start (they may then arrive twice
if the broker did take them).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

from streamer.events.fanout import Channel, Item, LostFactory, RateLimitedLog, count_events
from streamer.events.ocsf import EVENT_FORMATS, EventFormat, ocsf_items
from streamer.events.sinks.spool import Dropped, Rec, Record, Spool
from streamer.events.tasks import own_cancel_only, raise_sole, stop_task

log = logging.getLogger("microseg.sink.kafka")

DEFAULT_TOPIC = "microseg.flows"
DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024
# While the broker is up, new records start going to the spool only once the sink's channel
# has less free room than this (sixteen of the source's largest drains: the source may drain
# several times before the intake looks again), and then enough of them to leave twice that.
SPOOL_HEADROOM = 16384
SPOOL_CHECK_SECONDS = 0.05  # a waiting intake looks at the channel at least this often
INTAKE_BATCH = 4096  # records taken from the channel at a time
# Records handed to the producer per round at most: about one full batch. At a steady rate a
# round is what arrived during the previous round trip (hundreds of records); after a stall
# rounds of this size still clear a backlog at ~300,000/s. Larger rounds (several batches
# queued in the producer behind each other) made each round trip several, and the next round
# as large again: at 100,000/s the batches then stayed big and p50 went from ~10 to ~120 ms.
SEND_ROUND = 4096


def best_compression() -> str:
    """zstd or lz4 when their codec imports (aiokafka uses cramjam for both), else gzip.

    zstd first: at aiokafka's levels (zstd 3, lz4 9) it costs about 0.4 µs per 450-byte
    event where lz4 costs 2.7, and compresses our JSON 24x where lz4 does 14x."""
    from aiokafka import codec

    if codec.has_zstd():
        return "zstd"
    if codec.has_lz4():
        return "lz4"
    return "gzip"


@dataclass(frozen=True)
class KafkaSinkConfig:
    bootstrap: str  # HOST:PORT[,HOST:PORT...]
    spool_dir: Path
    topic: str = DEFAULT_TOPIC
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    # 0: round-trip batching (a batch goes as soon as the previous request is answered).
    # More: every batch also waits this long in the producer after it is handed over (a
    # fixed linger on top of the round trip: 10 ms cost ~20 ms of latency at any rate).
    linger_ms: int = 0
    # Records per batch, before compression. aiokafka keeps one request in flight per
    # broker, each carrying one batch per partition, so a partition's throughput is about a
    # batch per round trip: 2 MiB (~4,600 events) gives room far above 100,000/s and fewer
    # requests per event when behind, and compressed (~25x; JSON this repetitive never
    # below 3x) it stays below the broker's 1 MB message limit.
    max_batch_bytes: int = 2 * 1024 * 1024
    window_records: int = 20_000
    stall_seconds: float = 2.0
    request_timeout_ms: int = 10_000
    partitions: int = 1  # when we create the topic
    replication_factor: int = 1
    compression: str | None = None  # None: best_compression()
    client_id: str = field(default_factory=lambda: f"microseg-{socket.gethostname()}")
    stop_timeout: float = 5.0  # at stop: time to deliver what is still unacknowledged
    # ocsf: each record's value an OCSF 1.3.0 event (streamer.events.ocsf), made as the sink
    # takes it (records already in the spool go out as they were written).
    format: EventFormat = "microseg"

    def __post_init__(self) -> None:
        if self.format not in EVENT_FORMATS:
            raise ValueError(f"Kafka format {self.format!r}: not one of {EVENT_FORMATS}")


@dataclass
class _Batch:
    recs: Sequence[Record]
    future: asyncio.Future[Any]
    sent_ns: int
    producer: Any  # the producer it was handed to
    events: int  # flow events among recs (the rest are lost records)
    replayed: int  # of those, how many came out of the spool


_SPOOLED = attrgetter("spooled")  # Rec.spooled; an Item's is always False


def _fill_batch(batch: Any, recs: Sequence[Record]) -> int:
    """Append `recs` to an aiokafka BatchBuilder, in order, until it is full; how many went in.

    Every record gets the same timestamp (now, in ms: one clock read per batch). Straight into
    aiokafka's C record builder when the BatchBuilder looks like the one this was written
    against (aiokafka 0.14; tests/unit/test_kafka_sink.py checks the two ways build the same
    batch): its `append` wrapper costs about three times the append itself, per event.
    Otherwise through the public `append`."""
    ts_ms = time.time_ns() // 1_000_000
    inner: Any = getattr(batch, "_builder", None)
    if (
        getattr(batch, "_relative_offset", None) != 0
        or getattr(batch, "_closed", True)
        or getattr(batch, "_key_serializer", 0) is not None
        or getattr(batch, "_value_serializer", 0) is not None
        or not callable(getattr(inner, "append", None))
    ):
        taken = 0
        for r in recs:
            if batch.append(key=r.key, value=r.data, timestamp=ts_ms) is None:
                break
            taken += 1
        return taken
    append = inner.append
    headers: list[tuple[str, bytes]] = []
    taken = 0
    for r in recs:
        if append(taken, ts_ms, r.key, r.data, headers) is None:
            batch.close()
            break
        taken += 1
    batch._relative_offset = taken
    return taken


def _as_rec(r: Record) -> Rec:
    """A record as a Rec (they go into the retry heap, which orders them by seq)."""
    return r if isinstance(r, Rec) else Rec(r.seq, r.weight, r.key, r.data)


class KafkaSink:
    name = "kafka"

    def __init__(self, config: KafkaSinkConfig, make_lost: LostFactory | None = None) -> None:
        """`make_lost(lost, stage, first_seq, last_seq) -> Item`: builds the lost records this
        sink puts in its own stream (spool overflow, refused records)."""
        self.config = config
        self.compression = config.compression or best_compression()
        aiokafka_log = logging.getLogger("aiokafka")
        if aiokafka_log.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
            # aiokafka logs every failed connection attempt as an error; this sink says the
            # same (rate-limited) in its own words. `microseg -v` shows both.
            aiokafka_log.setLevel(logging.CRITICAL)
        self._make_lost = make_lost
        self._ocsf = config.format == "ocsf"
        self.spool: Spool | None = None
        self._producer: Any = None
        self._partitions: list[int] = [0]
        self._part_cache: dict[bytes, int] = {}
        self._out: deque[Record] = deque()  # to send directly, in order
        self._retry: list[Rec] = []  # heap by seq: taken, not delivered, to send again first
        self._inflight: deque[_Batch] = deque()
        self._inflight_recs = 0
        self._connected = False
        self._stalled = False
        self._stopping = False
        self._broken = asyncio.Event()
        self._wake_pump = asyncio.Event()
        self._wake_acks = asyncio.Event()
        self._room = asyncio.Event()  # set when acknowledgements free room in the window
        self._ratelog = RateLimitedLog(log)
        self._latencies: deque[float] = deque(maxlen=4096)
        # counters (events, i.e. record weights of flow events; lost records not counted)
        self.received = 0
        self.delivered = 0
        self.replayed = 0
        self.spooled = 0
        self.spool_dropped = 0
        self.failed = 0
        self.lost_records_sent = 0
        self.batches = 0
        self.reconnects = 0

    # ---- state ------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._connected and not self._stalled

    def _direct_room(self) -> int:
        """How many records may go straight to the producer now (0: to the spool)."""
        assert self.spool is not None
        if not self.up or self._retry or not self.spool.empty:
            return 0
        return max(0, self.config.window_records - self._inflight_recs - len(self._out))

    async def _await_room(self, channel: Channel) -> int:
        """How many records to take from the channel next, once there is a reason to.

        While the broker is up but the send window is full (or the spool is still being
        replayed: newer records must wait behind it), new records stay in the channel, a busy
        broker being no reason to write to disk. Only when the channel is within a couple of
        drains of overflowing are records taken anyway (to the spool), and then only enough
        to leave it that much room: spooling costs the most exactly when the agent is behind
        (every record written to disk and read back), so only the overflow pays for it."""
        assert self.spool is not None
        room = min(channel.maxsize // 4, SPOOL_HEADROOM)
        spool_at = channel.maxsize - room
        channel.notify_at(spool_at, self._room.set)
        while (
            self.up
            and not self._retry
            and not channel.closed
            and (
                not self.spool.empty
                or self._inflight_recs + len(self._out) >= self.config.window_records
            )
        ):
            if channel.depth >= spool_at:
                return max(1, channel.depth - (spool_at - room))
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                # Woken by acknowledgements, the spool running empty and the channel
                # reaching spool_at; the timeout is a safety net.
                await asyncio.wait_for(self._room.wait(), SPOOL_CHECK_SECONDS)
        direct = self._direct_room()
        # Up and nothing spooled: no more than the window takes (the rest would be spooled).
        return min(INTAKE_BATCH, direct) if direct > 0 else INTAKE_BATCH

    def _partition(self, key: bytes) -> int:
        parts = self._partitions
        if len(parts) == 1:
            return parts[0]
        p = self._part_cache.get(key)
        if p is None:
            from aiokafka.partitioner import murmur2

            p = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
            if len(self._part_cache) >= 65536:
                self._part_cache.clear()
            self._part_cache[key] = p
        return p

    # ---- the sink ------------------------------------------------------------------------------

    async def run(self, channel: Channel) -> None:
        """Until the channel is closed and drained (then `stop_timeout` to deliver the rest).

        The connection, pump and acks tasks run in a TaskGroup under this one: if one of them
        fails, the others and the intake stop, what was taken and not acknowledged goes back
        to the spool, and this raises that failure (the sink's supervisor restarts it)."""
        cfg = self.config
        self.spool = await asyncio.to_thread(Spool, cfg.spool_dir, cfg.spool_max_bytes)
        self._stopping = False
        try:
            async with asyncio.TaskGroup() as tg:
                conn = tg.create_task(
                    own_cancel_only(self._connection(), "kafka-connection"),
                    name="kafka-connection",
                )
                pump = tg.create_task(
                    own_cancel_only(self._pump(), "kafka-pump"), name="kafka-pump"
                )
                acks = tg.create_task(
                    own_cancel_only(self._acks(), "kafka-acks"), name="kafka-acks"
                )
                try:
                    await self._intake(channel)
                    await self._drain(time.monotonic() + cfg.stop_timeout)
                finally:
                    self._stopping = True
                    await stop_task(pump)
                    # Let the producer deliver what it holds while acks still counts it.
                    await self._close_producer(cfg.stop_timeout if self.up else 0.5)
                    await stop_task(acks)
                    await stop_task(conn)
        except BaseExceptionGroup as group:
            raise_sole(group)
        finally:
            self._save_unsent()
            self.spool.close()
            self._connected = False

    async def _intake(self, channel: Channel) -> None:
        assert self.spool is not None
        while True:
            items = await channel.get_batch(await self._await_room(channel))
            if not items:
                return
            if self._ocsf:
                items = ocsf_items(items)
            self.received += count_events(items)
            direct = self._direct_room()
            if direct >= len(items):
                self._out.extend(items)
            else:
                self._out.extend(items[:direct])
                self._spool_append(items[direct:])
            self._wake_pump.set()

    def _spool_append(self, recs: Sequence[Record]) -> None:
        assert self.spool is not None
        try:
            dropped = self.spool.append(recs)
            self.spool.flush()
        except OSError as e:
            n = count_events(recs)
            self.spool_dropped += n
            self._ratelog(
                logging.ERROR,
                "spool-write",
                "Kafka spool %s: writing failed, %d events lost: %s",
                self.config.spool_dir,
                n,
                e.strerror or e,
            )
            self._report_lost(sum(r.weight for r in recs), "kafka-spool", recs[0].seq, recs[-1].seq)
            return
        self.spooled += count_events(recs)
        if dropped is not None:
            self._spool_overflow(dropped)

    def _spool_overflow(self, d: Dropped) -> None:
        assert self.spool is not None
        self.spool_dropped += d.weight
        self._ratelog(
            logging.WARNING,
            "spool-full",
            "Kafka spool %s is full (%d bytes): dropped the oldest %d records (%d events)",
            self.config.spool_dir,
            self.config.spool_max_bytes,
            d.records,
            d.weight,
        )
        self._report_lost(d.weight, "kafka-spool", d.first_seq, d.last_seq)

    def _report_lost(self, lost: int, stage: str, first_seq: int, last_seq: int) -> None:
        """A lost record into this sink's own stream, where the gap is: before everything
        still waiting to be sent (it takes the place of the oldest waiting records)."""
        if self._make_lost is None:
            return
        item: Item = self._make_lost(lost, stage, first_seq, last_seq)
        if self._ocsf:
            item = ocsf_items([item])[0]
        heapq.heappush(self._retry, Rec(item.seq, item.weight, item.key, item.data))
        self._wake_pump.set()

    # ---- sending ----------------------------------------------------------------------------

    def _next_recs(self) -> Sequence[Record]:
        """Up to one round of records to send: retries, then direct ones, then the spool."""
        assert self.spool is not None
        room = self.config.window_records - self._inflight_recs
        if room <= 0:
            return []
        n = min(room, SEND_ROUND)
        if self._out and not self._retry:
            out = self._out
            if len(out) <= n:  # the usual case: everything that came since the last round
                every = list(out)
                out.clear()
                return every
            return [out.popleft() for _ in range(n)]
        if self._retry or self._out:
            # Both in sequence order: merge them (a lost record in the heap may belong
            # after some of the direct ones).
            res: list[Record] = []
            retry, out = self._retry, self._out
            while len(res) < n and (retry or out):
                if not out or (retry and retry[0].seq < out[0].seq):
                    res.append(heapq.heappop(retry))
                else:
                    res.append(out.popleft())
            return res
        if self.up and not self.spool.empty:
            try:
                recs = self.spool.take(n, 2 * self.config.max_batch_bytes)
                if self.spool.empty:
                    self._room.set()  # new records may go directly again
                return recs
            except OSError as e:
                self._ratelog(
                    logging.ERROR,
                    "spool-read",
                    "Kafka spool %s: reading failed: %s",
                    self.config.spool_dir,
                    e,
                )
        return []

    async def _pump(self) -> None:
        while True:
            await self._wake_pump.wait()
            self._wake_pump.clear()
            while self._producer is not None and self._connected and not self._awaiting_ack():
                recs = self._next_recs()
                if not recs:
                    break
                await self._send(recs)

    def _awaiting_ack(self) -> bool:
        """Whether the next batch must wait for an answer first.

        Keeping up (less than a round waiting): while a batch handed to the producer is
        unanswered, so the next one goes when the answer comes and takes everything that
        arrived meanwhile (aiokafka sends one request per broker at a time: a batch handed
        over earlier would only wait in the producer, closed to what came after it). Behind
        (a round or more waiting): one more batch may wait in the producer behind the one
        in flight, so the broker gets it the moment it answers, without waiting for this
        task to fill it. Also while a batch failed and the acks task has yet to take its
        records back."""
        unanswered = 0
        for b in self._inflight:
            f = b.future
            if not f.done():
                unanswered += 1
            elif f.cancelled() or f.exception() is not None:
                return True
        if unanswered == 0:
            return False
        return unanswered > 1 or self._backlog() < SEND_ROUND

    def _backlog(self) -> int:
        """Records waiting to be handed to the producer (the spool's included)."""
        n = len(self._out) + len(self._retry)
        if n < SEND_ROUND and self.spool is not None and self.up:
            n += self.spool.records
        return n

    def _answered(self, _fut: asyncio.Future[Any]) -> None:
        """Wake the pump the moment a batch is answered: the acks task wakes it too, but only
        a few loop turns later (after its asyncio.wait returns), and a source drain of ~3 ms
        may run in between; `_awaiting_ack` already counts an answered batch as done."""
        self._wake_pump.set()

    async def _send(self, recs: Sequence[Record]) -> None:
        """Hand `recs` to the producer in per-partition batches; on any failure (or being
        cancelled) what was not handed over goes back to the retry heap."""
        from aiokafka.errors import KafkaTimeoutError

        producer = self._producer
        pending: list[tuple[int, Sequence[Record]]]
        if len(self._partitions) == 1:
            pending = [(self._partitions[0], recs)]
        else:
            groups: dict[int, list[Record]] = {}
            for r in recs:
                groups.setdefault(self._partition(r.key), []).append(r)
            pending = list(groups.items())
        try:
            while pending:
                part, group = pending[0]
                batch = producer.create_batch()
                taken = _fill_batch(batch, group)
                if taken == 0:
                    # One record larger than a batch: the broker would refuse it anyway.
                    self._refused(group[:1], "larger than the producer's batch size")
                    taken = 1
                else:
                    if self.config.linger_ms == 0:
                        # Closed: aiokafka sends it as soon as the broker's connection is
                        # free (an open batch lingers linger_ms from being handed over).
                        batch.close()
                    fut = await producer.send_batch(batch, self.config.topic, partition=part)
                    fut.add_done_callback(self._answered)
                    sent = group[:taken] if taken < len(group) else group
                    replayed: int = sum(map(_SPOOLED, sent))
                    if replayed:  # events only (spooled lost records are not counted)
                        replayed = sum(1 for r in sent if r.spooled and not r.is_lost)
                    self._inflight.append(
                        _Batch(
                            sent,
                            fut,
                            time.monotonic_ns(),
                            producer,
                            count_events(sent),
                            replayed,
                        )
                    )
                    self._inflight_recs += taken
                    self._wake_acks.set()
                rest = group[taken:]
                if rest:
                    pending[0] = (part, rest)
                else:
                    pending.pop(0)
        except BaseException as e:
            for _part, group in pending:
                for r in group:
                    heapq.heappush(self._retry, _as_rec(r))
            if not isinstance(e, Exception):
                raise
            if isinstance(e, KafkaTimeoutError):
                # The producer's queue for the partition stayed full (the broker is slow or
                # away): not a broken producer; the acks task decides about stalling.
                await asyncio.sleep(0.1)
                return
            self._producer_failed(e, producer)

    def _refused(self, recs: Sequence[Record], why: str) -> None:
        events = [r for r in recs if not r.is_lost]
        self.failed += len(events)
        self._ratelog(
            logging.ERROR,
            "refused",
            "Kafka refused %d records (%s): counted as lost",
            len(recs),
            why,
        )
        self._report_lost(
            sum(r.weight for r in recs), "kafka", recs[0].seq, max(r.seq for r in recs)
        )

    def _producer_failed(self, e: BaseException, producer: Any) -> None:
        if producer is not self._producer or self._stopping:
            return  # an old producer's batches failing as it closes
        self._ratelog(
            logging.WARNING,
            "producer",
            "Kafka producer at %s failed (%s: %s): reconnecting; events go to the spool",
            self.config.bootstrap,
            type(e).__name__,
            e,
        )
        self._connected = False
        self._broken.set()

    async def _acks(self) -> None:
        from aiokafka.errors import KafkaError

        cfg = self.config
        while True:
            if not self._inflight:
                self._wake_acks.clear()
                await self._wake_acks.wait()
                continue
            b = self._inflight[0]
            if not b.future.done():
                age = (time.monotonic_ns() - b.sent_ns) / 1e9
                # asyncio.wait, not wait_for: the batch's outcome (an error, or the producer
                # cancelling it) is looked at below, and never ends this task.
                done, _ = await asyncio.wait([b.future], timeout=max(0.01, cfg.stall_seconds - age))
                if not done:
                    if not self._stalled:
                        self._stalled = True
                        log.warning(
                            "Kafka at %s has not acknowledged for %.1f s: spooling events to %s",
                            cfg.bootstrap,
                            cfg.stall_seconds,
                            cfg.spool_dir,
                        )
                    await asyncio.wait([b.future])
            self._inflight.popleft()
            self._inflight_recs -= len(b.recs)
            self._room.set()
            exc = b.future.exception() if not b.future.cancelled() else asyncio.CancelledError()
            if exc is None:
                self._delivered(b)
            elif isinstance(exc, KafkaError) and not _fatal(exc) and not exc.retriable:
                self._refused(b.recs, f"{type(exc).__name__}: {exc}")
            else:
                for r in b.recs:
                    heapq.heappush(self._retry, _as_rec(r))
                self._producer_failed(exc, b.producer)
            self._wake_pump.set()

    def _delivered(self, b: _Batch) -> None:
        self.batches += 1
        self._latencies.append((time.monotonic_ns() - b.sent_ns) / 1e9)
        self.lost_records_sent += len(b.recs) - b.events
        self.delivered += b.events
        self.replayed += b.replayed
        if self._stalled:
            self._stalled = False
            assert self.spool is not None
            log.info(
                "Kafka at %s acknowledges again: replaying %d spooled records",
                self.config.bootstrap,
                self.spool.records,
            )

    async def _drain(self, deadline: float) -> None:
        """At stop: give the pump until `deadline` to send everything (spool included)."""
        assert self.spool is not None
        while time.monotonic() < deadline:
            if not (self._out or self._retry or self._inflight) and (
                self.spool.empty or not self.up
            ):
                return
            if not self.up and not self._inflight and not self._out and not self._retry:
                return
            self._wake_pump.set()
            await asyncio.sleep(0.02)

    def _save_unsent(self) -> None:
        """Records not acknowledged go back to the spool's front, in order."""
        assert self.spool is not None
        recs = [*self._retry, *self._out]
        for b in self._inflight:
            recs.extend(b.recs)
        self._retry.clear()
        self._out.clear()
        self._inflight.clear()
        self._inflight_recs = 0
        if not recs:
            return
        recs.sort(key=lambda r: r.seq)
        try:
            self.spool.prepend(recs)
            log.info(
                "Kafka: %d unacknowledged records kept in the spool for the next start", len(recs)
            )
        except OSError as e:
            n = count_events(recs)
            self.spool_dropped += n
            log.error(
                "Kafka spool %s: could not keep %d unsent events: %s", self.config.spool_dir, n, e
            )

    # ---- connection ----------------------------------------------------------------------------

    async def _connection(self) -> None:
        backoff = 0.5
        first = True
        while True:
            if self._producer is not None:
                await self._close_producer(1.0)
            try:
                producer = await self._connect()
            except Exception as e:
                self._ratelog(
                    logging.WARNING,
                    "connect",
                    "Kafka at %s unreachable (%s): events go to the spool %s; retrying",
                    self.config.bootstrap,
                    _describe(e),
                    self.config.spool_dir,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            self._producer = producer
            self._broken.clear()
            self._stalled = False
            self._connected = True
            if not first:
                self.reconnects += 1
            first = False
            assert self.spool is not None
            log.info(
                "Kafka: streaming to topic %s at %s (%s compression, %d partitions)%s",
                self.config.topic,
                self.config.bootstrap,
                self.compression,
                len(self._partitions),
                f"; replaying {self.spool.records} spooled records" if self.spool.records else "",
            )
            self._wake_pump.set()
            await self._broken.wait()

    async def _connect(self) -> Any:
        from aiokafka import AIOKafkaProducer

        cfg = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap,
            client_id=cfg.client_id,
            acks="all",
            enable_idempotence=True,
            compression_type=self.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_bytes,
            max_request_size=max(cfg.max_batch_bytes * 2, 1 << 20),
            request_timeout_ms=cfg.request_timeout_ms,
            retry_backoff_ms=200,
        )
        try:
            await asyncio.wait_for(producer.start(), cfg.request_timeout_ms / 1000)
            await asyncio.wait_for(self._ensure_topic(), cfg.request_timeout_ms / 1000)
            parts = await asyncio.wait_for(
                producer.partitions_for(cfg.topic), cfg.request_timeout_ms / 1000
            )
        except BaseException:
            await self._stop_producer(producer, 1.0)
            raise
        self._partitions = sorted(parts)
        self._part_cache.clear()
        return producer

    async def _ensure_topic(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import TopicAlreadyExistsError, for_code

        cfg = self.config
        admin = AIOKafkaAdminClient(
            bootstrap_servers=cfg.bootstrap,
            client_id=f"{cfg.client_id}-admin",
            request_timeout_ms=cfg.request_timeout_ms,
        )
        await admin.start()
        try:
            if cfg.topic in await admin.list_topics():
                return
            resp = await admin.create_topics(
                [NewTopic(cfg.topic, cfg.partitions, cfg.replication_factor)]
            )
            for err in getattr(resp, "topic_errors", []):
                code = err[1]
                if code and for_code(code) is not TopicAlreadyExistsError:
                    raise for_code(code)(f"creating topic {cfg.topic}: {err[2:]}")
            log.info("Kafka: created topic %s (%d partitions)", cfg.topic, cfg.partitions)
        finally:
            await admin.close()

    async def _close_producer(self, timeout: float) -> None:
        producer, self._producer = self._producer, None
        self._connected = False
        if producer is not None:
            await self._stop_producer(producer, timeout)

    @staticmethod
    async def _stop_producer(producer: Any, timeout: float) -> None:
        """Stop `producer`, letting it deliver for up to `timeout` s. Its unfinished batches
        fail then (their records are ours to keep): aiokafka's stop() would otherwise wait
        for them for as long as the broker stays away."""
        from aiokafka.errors import KafkaError

        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(producer.flush()), timeout)
        finally:
            # Also when cancelled while flushing: a producer not stopped keeps its sender
            # task running, which nobody would ever await.
            with contextlib.suppress(Exception):
                producer._message_accumulator.fail_all(KafkaError("the agent closed the producer"))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), max(timeout, 2.0))

    # ---- accounting ----------------------------------------------------------------------------

    def latency(self) -> dict[str, float | None]:
        samples = sorted(list(self._latencies))
        if not samples:
            return {"p50_ms": None, "p99_ms": None}

        def pct(p: float) -> float:
            return round(samples[min(len(samples) - 1, int(p * len(samples)))] * 1000, 3)

        return {"p50_ms": pct(0.50), "p99_ms": pct(0.99)}

    def stats(self) -> dict[str, Any]:
        spool = self.spool
        lat = self.latency()
        return {
            "delivered": self.delivered,
            "spooled": self.spooled,
            "replayed": self.replayed,
            "dropped": self.spool_dropped + self.failed,
            "spool_dropped": self.spool_dropped,
            "failed": self.failed,
            "lost_records_sent": self.lost_records_sent,
            "spool_records": spool.records if spool else 0,
            "spool_bytes": spool.nbytes if spool else 0,
            "spool_max_bytes": self.config.spool_max_bytes,
            "inflight": self._inflight_recs,
            "batches": self.batches,
            "waiting": len(self._out) + len(self._retry),
            "connected": self._connected,
            "up": self.up,
            "reconnects": self.reconnects,
            "send_latency_p50_ms": lat["p50_ms"],
            "send_latency_p99_ms": lat["p99_ms"],
            "topic": self.config.topic,
            "bootstrap": self.config.bootstrap,
            "compression": self.compression,
        }


def _fatal(exc: BaseException) -> bool:
    """Errors after which the producer itself is unusable (a new one is made)."""
    from aiokafka.errors import (
        IllegalStateError,
        OutOfOrderSequenceNumber,
        ProducerClosed,
        ProducerFenced,
        UnknownProducerId,
    )

    return (
        isinstance(
            exc,
            OutOfOrderSequenceNumber
            | ProducerFenced
            | ProducerClosed
            | IllegalStateError
            | UnknownProducerId,
        )
        or type(exc).__name__ == "KafkaError"
    )


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, TimeoutError):
        return "timed out"
    return text
