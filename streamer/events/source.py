"""Source: the ring buffer's records, drained on the event loop (no thread).

In: a loaded Datapath. Out: batches of raw records (bytes, one struct ms_event each) handed
synchronously to `handle`, and increases of the kernel's `events_lost` counter (ring-buffer
reservations that failed) handed to `on_lost`. The ring buffer's fd is watched with
`loop.add_reader`; each drain copies the records out, so the kernel can reuse the space at
once. `handle` must not block: what follows it is queued.

On x86-64 the ring buffer is read through its own memory map (`RingReader`, the protocol
libbpf implements: a record per 8-byte header, the consumer position written back; a drain of
same-size records is copied out as one block, `decode.Packed`, no Python work per record);
elsewhere through libbpf's callback per record (`Datapath.open_events`), which costs about
three times as much per event. x86-64 only because the reader relies on its ordering of
loads: a record's data is visible once its header says it is committed.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import platform
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamer.datapath.layout import EVENT
from streamer.events.decode import Packed

log = logging.getLogger("microseg.source")


@dataclass(frozen=True)
class SourceConfig:
    lost_poll_interval: float = 0.5  # how often the kernel's lost counter is read
    # Records per drain: a larger backlog is taken in several drains with the event loop
    # free in between, so one burst never monopolises it (and queues downstream stay sane).
    # A drain of 1,024 is rendered in ~3 ms; the other stages (the Kafka sink, its acks)
    # get the loop in between, where 4,096 held it four times as long.
    max_batch: int = 1024
    # After a drain that did not fill a batch, the ring buffer is left alone this long, so
    # events arriving at a moderate rate are taken (and sent on) in batches rather than one
    # wakeup each; at a high rate every drain is full and there is no pause. The ring buffer
    # must hold this long's events (256 pages hold ~12,000).
    min_drain_interval: float = 0.002
    own_reader: bool = True  # RingReader where supported, else libbpf's callbacks


_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR_SIZE = 8


class RingReader:
    """A BPF ring buffer read through its memory map (what libbpf's ring_buffer__consume does,
    without a call into Python per record).

    In: the map's fd and data size (a power of two). `read(n)` returns up to n committed
    records (copies, in order) and releases their space to the kernel; discarded records are
    skipped, and a record still being written ends the read (it comes next time)."""

    def __init__(self, fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power of two")
        page = mmap.PAGESIZE
        self.fd = fd
        self._mask = size - 1
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        try:
            # The producer page, then the data mapped twice in a row: a record that wraps
            # around the end reads as one piece.
            self._prod = mmap.mmap(
                fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            self._cons.close()
            raise
        self._base = page
        # Positions and length words go through native-format memoryviews: one aligned load
        # or store each (struct's "<Q" would move bytes one by one, and the kernel could read
        # a torn consumer position, see the ring as full and drop events).
        self._cons_pos = memoryview(self._cons).cast("Q")
        self._words = memoryview(self._prod).cast("I")  # [0:2]: the producer position
        self._prod_pos = memoryview(self._prod)[:8].cast("Q")
        self._pos: int = self._cons_pos[0]

    def read(self, max_records: int) -> list[bytes]:
        prod, words = self._prod, self._words
        end: int = self._prod_pos[0]
        pos, mask, base = self._pos, self._mask, self._base
        out: list[bytes] = []
        while pos < end and len(out) < max_records:
            off = base + (pos & mask)
            word: int = words[off >> 2]
            if word & _BUSY:
                break
            n = word & ~(_BUSY | _DISCARD)
            if not word & _DISCARD:
                out.append(prod[off + _HDR_SIZE : off + _HDR_SIZE + n])
            pos += (n + _HDR_SIZE + 7) & ~7
        if pos != self._pos:
            self._pos = pos
            self._cons_pos[0] = pos
        return out

    def read_packed(self, max_records: int, size: int) -> Packed | list[bytes]:
        """Up to `max_records` committed records in one piece (`Packed`, their headers left
        in) while they are all `size` bytes, the usual case: two copies of the block and no
        Python work per record. Anything else (a discarded record, one of another size, an
        empty ring) goes through `read`."""
        stride = (size + _HDR_SIZE + 7) & ~7
        end: int = self._prod_pos[0]
        pos = self._pos
        n = min((end - pos) // stride, max_records)
        if n <= 0:
            return self.read(max_records)
        off = self._base + (pos & self._mask)
        # The headers are read from a first copy; only records already committed in it are
        # taken, copied again after that (x86-64 keeps loads in order: the second copy sees
        # the data the kernel wrote before committing).
        first = self._prod[off : off + n * stride]
        with memoryview(first) as mv, mv.cast("I") as words:
            heads = words[:: stride // 4]
            if heads.tobytes() != _same_words(size, n):
                hl = heads.tolist()
                n = next(i for i, w in enumerate(hl) if w != size)
        if n == 0:
            return self.read(max_records)
        data = self._prod[off : off + n * stride]
        pos += n * stride
        self._pos = pos
        self._cons_pos[0] = pos
        return Packed(data, n, stride, _HDR_SIZE)

    def close(self) -> None:
        for view in (self._cons_pos, self._words, self._prod_pos):
            view.release()
        self._prod.close()
        self._cons.close()


_WORDS: dict[int, bytes] = {}


def _same_words(value: int, n: int) -> bytes:
    """`n` native 32-bit words of `value`: the headers of n committed records of one size."""
    b = _WORDS.get(value)
    if b is None or len(b) < 4 * n:
        b = _WORDS[value] = array("I", [value]).tobytes() * max(n, 4096)
    return b[: 4 * n]


def own_reader_supported() -> bool:
    """Whether RingReader may be used here (x86-64: see the module's docstring)."""
    return platform.machine() in ("x86_64", "AMD64")


class Source:
    def __init__(
        self,
        datapath: Any,
        handle: Callable[[list[bytes] | Packed], None],
        on_lost: Callable[[int], None],
        config: SourceConfig | None = None,
        *,
        drain_mark: Callable[[], int] | None = None,
        drained: Callable[[int], None] | None = None,
    ) -> None:
        """`drain_mark()` is called before each drain and its value given to `drained()`
        after it (the enricher retires policy generations this way)."""
        self.datapath = datapath
        self.config = config or SourceConfig()
        self._handle = handle
        self._on_lost = on_lost
        self._drain_mark = drain_mark
        self._drained = drained
        self._batch: list[bytes] = []
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused: asyncio.TimerHandle | None = None
        self._ring: RingReader | None = None
        self.reader = ""  # how the ring buffer is read: mmap or libbpf
        self._lost_base = 0
        self.received = 0
        self.drains = 0
        self.max_batch = 0
        self.kernel_lost = 0  # since start
        self.handle_errors = 0
        self.busy_ns = 0  # time spent draining and handling

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the ring buffer and watch it; the lost counter's baseline is read now (an
        adopted classifier's counters carry earlier runs' losses)."""
        self._lost_base = int(self.datapath.counters().get("events_lost", 0))
        ring = getattr(self.datapath, "events_ring", None)
        if self.config.own_reader and ring is not None and own_reader_supported():
            self._ring = RingReader(*ring())
            self._fd = self._ring.fd
            self.reader = "mmap"
        else:
            self._fd = self.datapath.open_events(self._take)
            self.reader = "libbpf"
        self._loop = loop
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        n = self.consume()
        if n < self.config.max_batch and self.config.min_drain_interval > 0:
            assert self._loop is not None and self._fd is not None
            self._loop.remove_reader(self._fd)
            self._paused = self._loop.call_later(self.config.min_drain_interval, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self._fd is not None and self._loop is not None:
            self._loop.add_reader(self._fd, self._readable)

    def _take(self, record: bytes) -> bool:
        self._batch.append(record)
        return len(self._batch) < self.config.max_batch

    def consume(self) -> int:
        """Drain up to max_batch records now and hand them on; returns how many.

        What is left stays readable, so the loop calls this again after other work."""
        t0 = time.monotonic_ns()
        mark = self._drain_mark() if self._drain_mark is not None else 0
        if self._ring is not None:
            batch: list[bytes] | Packed = self._ring.read_packed(self.config.max_batch, EVENT.size)
        else:
            self.datapath.consume_events()
            batch = self._batch[:]
            self._batch.clear()
        self.drains += 1
        if batch:
            self.received += len(batch)
            self.max_batch = max(self.max_batch, len(batch))
            try:
                self._handle(batch)
            except Exception:
                # A bug downstream must not stop the draining (the kernel would start
                # losing events); the stages count what they dropped.
                self.handle_errors += 1
                log.exception("handling %d flow events failed", len(batch))
        if self._drained is not None:
            self._drained(mark)
        self.busy_ns += time.monotonic_ns() - t0
        return len(batch)

    def drain(self, max_rounds: int = 1024) -> None:
        """Everything in the ring buffer now (bounded), for the lost check and the stop."""
        for _ in range(max_rounds):
            if self.consume() < self.config.max_batch:
                return

    def check_lost(self) -> int:
        """Report an increase of the kernel's lost counter (after draining what did make it,
        so the lost record lands after those events). Without one nothing is drained here:
        draining a backlog in one go would hold the event loop for as long as it takes (at
        100,000 events/s, hundreds of ms), and every stage behind it with it."""
        if self._lost_total() <= self.kernel_lost:
            return 0
        self.drain()
        total = self._lost_total()
        delta = total - self.kernel_lost
        if delta > 0:
            self.kernel_lost = total
            self._on_lost(delta)
        return max(delta, 0)

    def _lost_total(self) -> int:
        """The kernel's lost events since start."""
        return int(self.datapath.counters().get("events_lost", 0)) - self._lost_base

    async def run(self) -> None:
        """Poll the lost counter until cancelled."""
        while True:
            await asyncio.sleep(self.config.lost_poll_interval)
            try:
                self.check_lost()
            except Exception as e:  # a map read failing must not end the polling
                log.warning("reading the kernel's lost-event counter failed: %s", e)

    def stop(self) -> None:
        """Stop watching; a last drain and lost check first."""
        if self._fd is not None and self._loop is not None:
            if self._paused is not None:
                self._paused.cancel()
                self._paused = None
            self._loop.remove_reader(self._fd)
            try:
                self.drain()
                self.check_lost()
            except Exception as e:
                log.warning("last drain of the ring buffer failed: %s", e)
            self._fd = None
            if self._ring is not None:
                self._ring.close()
                self._ring = None

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "drains": self.drains,
            "max_batch": self.max_batch,
            "kernel_lost": self.kernel_lost,
            "handle_errors": self.handle_errors,
            "reader": self.reader,
            "busy_seconds": round(self.busy_ns / 1e9, 3),
        }
