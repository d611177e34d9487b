"""Fan-out: every record to every sink, each through a bounded queue of its own.

In: `Item`s (an event or a `lost` record, serialized once) from the pipeline, in sequence
order. Out: one `Channel` per sink, read by that sink's own task. `publish` never waits: a full
channel drops the item and counts it; the channel then owes its sink a `lost` record covering
the dropped range, which it puts into the queue as soon as there is room again (before any
later item), so the sink's stream shows the gap where it is. A sink that fails is logged
(rate-limited), restarted after a pause, and never holds up the reader or another sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

log = logging.getLogger("microseg.fanout")


@dataclass(slots=True)
class Item:
    """One record on its way to the sinks.

    `weight`: flow events it stands for (1 for an event, `lost` for a lost record); `data`:
    the JSON object as orjson wrote it (no newline); `key`: the Kafka key.
    """

    seq: int
    weight: int
    obj: dict[str, Any]
    data: bytes
    key: bytes
    born_ns: int = 0  # time.monotonic_ns() when the pipeline made it

    @property
    def is_lost(self) -> bool:
        return bool(self.obj.get("type") == "lost")


def flow_key(obj: dict[str, Any]) -> bytes:
    """The Kafka key of a record: `<src_ip>-><dst_ip>` (SPEC §4); a lost record is keyed by
    its host, so one agent's lost records stay in order on one partition."""
    if obj.get("type") == "lost":
        return f"lost@{obj.get('host', '')}".encode()
    return f"{obj['src_ip']}->{obj['dst_ip']}".encode()


def make_item(obj: dict[str, Any], weight: int = 1) -> Item:
    """Serialize `obj` once for every sink."""
    return Item(
        seq=int(obj["seq"]),
        weight=weight,
        obj=obj,
        data=orjson.dumps(obj),
        key=flow_key(obj),
        born_ns=time.monotonic_ns(),
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


@dataclass
class Channel:
    """The bounded queue between the fan-out and one sink, with its accounting."""

    name: str
    maxsize: int
    make_lost: LostFactory
    queue: asyncio.Queue[Item | None] = field(init=False)
    received: int = 0  # events offered
    dropped: int = 0  # events dropped because the queue was full (or reported by the sink)
    lost_records: int = 0  # lost records put into this sink's stream
    closed: bool = False
    _gap: _Gap | None = None

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.maxsize)

    # ---- producer side ----------------------------------------------------------------------

    def offer(self, item: Item) -> bool:
        """Queue `item` without waiting; False (counted, and a gap noted) when full."""
        if not item.is_lost:
            self.received += 1
        if self.closed:
            self._note_drop(item)
            return False
        if self._gap is not None:
            self._fill_gap()
            if self._gap is not None:
                self._note_drop(item)
                return False
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._note_drop(item)
            return False
        return True

    def _note_drop(self, item: Item) -> None:
        if not item.is_lost:
            self.dropped += 1
        self.report_lost(item.weight, item.seq, item.seq)

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
        if g is None or self.queue.full():
            return
        self._gap = None
        self.lost_records += 1
        self.queue.put_nowait(self.make_lost(g.lost, self.name, g.first_seq, g.last_seq))

    @property
    def owes_lost(self) -> bool:
        return self._gap is not None

    def close(self) -> None:
        """No more items: the sink drains what is queued, then its `get_batch` returns []."""
        if self.closed:
            return
        self._fill_gap()  # a last chance for the gap's record, if there is room
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    # ---- consumer side ----------------------------------------------------------------------

    async def get_batch(self, max_items: int = 1024) -> list[Item]:
        """The next items (at least one, at most `max_items`); [] once closed and drained."""
        out: list[Item] = []
        while not out:
            if self.closed and self.queue.empty():
                return out
            first = await self.queue.get()
            if first is not None:
                out.append(first)
            out.extend(self.get_nowait_batch(max_items - len(out)))
        return out

    def get_nowait_batch(self, max_items: int = 1024) -> list[Item]:
        """Whatever is queued now (also for a final flush); then, with room again, a pending
        gap's record goes in before anything newer."""
        out: list[Item] = []
        while len(out) < max_items:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is not None:
                out.append(item)
        self._fill_gap()
        return out

    @property
    def depth(self) -> int:
        return self.queue.qsize()

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

    def publish(self, items: list[Item]) -> None:
        """Offer every item to every sink; never waits."""
        for ch in self.channels.values():
            for item in items:
                ch.offer(item)

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
                await sink.run(ch)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
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
