"""Fan-out: every record to every sink, each through a bounded queue of its own.

In: batches of `Item`s (an event or a `lost` record, serialized once) from the pipeline, in
sequence order. Out: one `Channel` per sink, read by that sink's own task. `publish` never
waits: a full channel drops what does not fit and counts it; the channel then owes its sink a
`lost` record covering the dropped range, which it puts into the queue as soon as there is room
again (before any later item), so the sink's stream shows the gap where it is. A sink that
fails (also by a CancelledError it was not asked for) is logged (rate-limited), restarted after
a pause, and never holds up the reader or another sink; one that fails while being cancelled
is not restarted, its error is raised by `Fanout.run`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

import orjson

from streamer.events.tasks import cancel_requested, own_cancel_only

log = logging.getLogger("microseg.fanout")


class Item:
    """One record on its way to the sinks.

    `weight`: flow events it stands for (1 for an event, `lost` for a lost record); `data`:
    the JSON object as serialized once for every sink (no newline); `key`: the Kafka key;
    `born_ns`: time.monotonic_ns() when the pipeline made it. `obj` is the parsed object,
    made only when a sink asks for it (most sinks only pass `data` on).
    """

    __slots__ = ("_obj", "born_ns", "data", "is_lost", "key", "seq", "weight")
    spooled = False  # never read back from the Kafka spool (that makes a spool.Rec)

    def __init__(
        self,
        seq: int,
        weight: int,
        data: bytes,
        key: bytes,
        born_ns: int = 0,
        *,
        obj: dict[str, Any] | None = None,
        is_lost: bool = False,
    ) -> None:
        self.seq = seq
        self.weight = weight
        self.data = data
        self.key = key
        self.born_ns = born_ns
        self.is_lost = is_lost
        self._obj = obj

    @property
    def obj(self) -> dict[str, Any]:
        if self._obj is None:
            self._obj = orjson.loads(self.data)
        return self._obj

    def __repr__(self) -> str:
        return f"Item(seq={self.seq}, weight={self.weight}, data={self.data[:60]!r}...)"


_IS_LOST = attrgetter("is_lost")
LOST_KEY_PREFIX = b"lost@"


def count_events(records: Sequence[Any]) -> int:
    """How many of `records` (Items, or the Kafka spool's records) are flow events, not
    `lost` records: what the per-stage counters count."""
    lost: int = sum(map(_IS_LOST, records))
    return len(records) - lost


def flow_key(obj: dict[str, Any]) -> bytes:
    """The Kafka key of a record: `<src_ip>-><dst_ip>` (docs/contract.md §4); a lost record is keyed
    `lost@<host>` and an alert `alert@<host>`, so one agent's stay in order on one partition."""
    kind = obj.get("type")
    if kind == "lost":
        return LOST_KEY_PREFIX + str(obj.get("host", "")).encode()
    if kind == "alert":
        return f"alert@{obj.get('host', '')}".encode()
    return f"{obj['src_ip']}->{obj['dst_ip']}".encode()


def make_item(obj: dict[str, Any], weight: int = 1) -> Item:
    """Serialize `obj` once for every sink."""
    return Item(
        int(obj["seq"]),
        weight,
        orjson.dumps(obj),
        flow_key(obj),
        time.monotonic_ns(),
        obj=obj,
        is_lost=obj.get("type") == "lost",
    )


LostFactory = Callable[[int, str, int, int], Item]
"""(lost, stage, first_seq, last_seq) -> a lost record Item."""


class RateLimitedLog:
    """Logs a message at most once per `interval` seconds per key, counting the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            msg = f"{msg} ({n} similar messages suppressed)"
        self._log.log(level, msg, *args)


@dataclass
class _Gap:
    first_seq: int
    last_seq: int
    lost: int


class Channel:
    """The bounded queue between the fan-out and one sink, with its accounting.

    Holds the published batches themselves (no per-item queue operations: a batch the queue
    has room for is taken whole), bounded by `maxsize` items.
    """

    def __init__(self, name: str, maxsize: int, make_lost: LostFactory) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size of sink {name} must be at least 1")
        self.name = name
        self.maxsize = maxsize
        self.make_lost = make_lost
        self.received = 0  # events offered
        self.dropped = 0  # events dropped because the queue was full (or the channel closed)
        self.lost_records = 0  # lost records put into this sink's stream
        self.closed = False
        self._gap: _Gap | None = None
        self._batches: deque[list[Item]] = deque()
        self._count = 0
        self._ready = asyncio.Event()
        self._high_level = 0
        self._on_high: Callable[[], None] | None = None

    # ---- producer side ----------------------------------------------------------------------

    def offer(self, item: Item) -> bool:
        """Queue `item` without waiting; False (counted, and a gap noted) when full."""
        return self.offer_batch([item], 0 if item.is_lost else 1) == 1

    def offer_batch(self, items: list[Item], events: int | None = None) -> int:
        """Queue what fits of `items` (in order) without waiting; returns how many went in.

        The rest is dropped, counted and noted as a gap. `events`: how many of `items` are
        flow events (not lost records), if the caller knows."""
        if events is None:
            events = count_events(items)
        self.received += events
        if not items:
            return 0
        if self.closed:
            self._note_drop(items)
            return 0
        if self._gap is not None:
            self._fill_gap()
            if self._gap is not None:
                self._note_drop(items)
                return 0
        room = self.maxsize - self._count
        if room <= 0:
            self._note_drop(items)
            return 0
        if room < len(items):
            self._note_drop(items[room:])
            items = items[:room]
        self._batches.append(items)
        self._count += len(items)
        self._ready.set()
        if self._on_high is not None and self._count >= self._high_level:
            self._on_high()
        return len(items)

    def notify_at(self, level: int, callback: Callable[[], None] | None) -> None:
        """Call `callback` whenever an offer leaves `level` or more items queued (a sink
        that leaves items queued on purpose learns when it must take them after all);
        None: no more calls."""
        self._high_level = level
        self._on_high = callback

    def _note_drop(self, items: list[Item]) -> None:
        self.dropped += count_events(items)
        self.report_lost(
            sum(i.weight for i in items),
            min(i.seq for i in items),
            max(i.seq for i in items),
        )

    def report_lost(self, lost: int, first_seq: int, last_seq: int) -> None:
        """`lost` events (seq `first_seq`..`last_seq`) will never reach this sink: its stream
        gets a lost record for them as soon as the queue has room."""
        if self._gap is None:
            self._gap = _Gap(first_seq, last_seq, lost)
        else:
            g = self._gap
            g.first_seq = min(g.first_seq, first_seq)
            g.last_seq = max(g.last_seq, last_seq)
            g.lost += lost

    def _fill_gap(self) -> None:
        g = self._gap
        if g is None or self._count >= self.maxsize:
            return
        self._gap = None
        self.lost_records += 1
        self._batches.append([self.make_lost(g.lost, self.name, g.first_seq, g.last_seq)])
        self._count += 1
        self._ready.set()

    @property
    def owes_lost(self) -> bool:
        return self._gap is not None

    @property
    def room(self) -> int:
        """Items `offer_batch` would take now (a pending gap's record needs a slot first)."""
        if self.closed:
            return 0
        return max(0, self.maxsize - self._count - (1 if self._gap is not None else 0))

    def shed(self, events: int, first_seq: int, last_seq: int) -> None:
        """`events` flow events (seq `first_seq`..`last_seq`) that were never made, because no
        sink had room for them: counted as received and dropped here, and a gap noted."""
        self.received += events
        self.dropped += events
        self.report_lost(events, first_seq, last_seq)

    def close(self) -> None:
        """No more items: the sink drains what is queued, then its `get_batch` returns []."""
        if self.closed:
            return
        self._fill_gap()  # a last chance for the gap's record, if there is room
        self.closed = True
        self._ready.set()

    # ---- consumer side ----------------------------------------------------------------------

    async def get_batch(self, max_items: int = 1024) -> list[Item]:
        """The next items (at least one, at most `max_items`); [] once closed and drained."""
        while not self._batches:
            if self.closed:
                return []
            self._ready.clear()
            await self._ready.wait()
        return self.get_nowait_batch(max_items)

    def get_nowait_batch(self, max_items: int = 1024) -> list[Item]:
        """Whatever is queued now (also for a final flush); then, with room again, a pending
        gap's record goes in before anything newer."""
        out: list[Item] = []
        batches = self._batches
        while batches and len(out) < max_items:
            b = batches[0]
            need = max_items - len(out)
            if len(b) <= need:
                out.extend(b)  # a copy: every channel was given the same list
                batches.popleft()
            else:
                out.extend(b[:need])
                batches[0] = b[need:]
        self._count -= len(out)
        self._fill_gap()
        return out

    @property
    def depth(self) -> int:
        return self._count

    def stats(self) -> dict[str, int]:
        return {
            "received": self.received,
            "queue_dropped": self.dropped,
            "queue_depth": self.depth,
            "queue_capacity": self.maxsize,
            "lost_records": self.lost_records,
        }


class Sink(Protocol):
    """A consumer of one channel. `run` returns once the channel is closed and everything
    it took is written (or accounted as lost); it is cancelled only if that takes too long."""

    name: str

    async def run(self, channel: Channel) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Fanout:
    """One channel and one task per sink."""

    def __init__(
        self, sinks: list[Sink], make_lost: LostFactory, queue_size: int | dict[str, int]
    ) -> None:
        self.sinks = list(sinks)
        self.channels: dict[str, Channel] = {}
        for s in self.sinks:
            size = queue_size if isinstance(queue_size, int) else queue_size.get(s.name, 8192)
            self.channels[s.name] = Channel(s.name, size, make_lost)
        self.sink_errors: dict[str, int] = {s.name: 0 for s in self.sinks}
        self._ratelog = RateLimitedLog(log)

    def room(self) -> int:
        """The most items any sink's queue would take now."""
        return max((ch.room for ch in self.channels.values()), default=0)

    def shed(self, events: int, first_seq: int, last_seq: int) -> None:
        """Account `events` flow events no sink had room for (see `Channel.shed`)."""
        for ch in self.channels.values():
            ch.shed(events, first_seq, last_seq)

    def publish(self, items: list[Item]) -> None:
        """Offer every item to every sink; never waits."""
        if not items:
            return
        events = count_events(items)
        for ch in self.channels.values():
            ch.offer_batch(items, events)

    async def run(self) -> None:
        """Run every sink until the channels are closed and drained (see `close`)."""
        async with asyncio.TaskGroup() as tg:
            for s in self.sinks:
                tg.create_task(self._supervise(s), name=f"sink-{s.name}")

    async def _supervise(self, sink: Sink) -> None:
        ch = self.channels[sink.name]
        backoff = 0.2
        while True:
            started = time.monotonic()
            try:
                await own_cancel_only(sink.run(ch), f"sink {sink.name}")
                return
            except Exception as e:
                if cancel_requested():
                    # Failed while being stopped (the pipeline's stop timeout): no restart;
                    # the error goes to whoever stops the sinks.
                    raise
                self.sink_errors[sink.name] += 1
                if time.monotonic() - started > 5.0:
                    backoff = 0.2  # it worked for a while: a new failure, not the same one
                self._ratelog(
                    logging.ERROR,
                    f"crash:{sink.name}",
                    "sink %s failed (%s: %s); restarting it in %.1f s",
                    sink.name,
                    type(e).__name__,
                    e,
                    backoff,
                )
                log.debug("sink %s failure", sink.name, exc_info=True)
                # Also when stopping: the sink gets to write what is queued (the pipeline's
                # stop timeout bounds how long that may take).
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for s in self.sinks:
            d: dict[str, Any] = dict(self.channels[s.name].stats())
            d.update(s.stats())
            d["errors"] = self.sink_errors[s.name]
            out[s.name] = d
        return out
